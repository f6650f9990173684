"""Train what is missing with the stock nnUNetv2_train, evaluate every trainer, ensemble each diffusion model
with the baseline: the library behind `nnunet-diffusion ablate` (see that command's help)."""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, with_plugin_environment
from nnunet_diffusion.evaluation.metrics import evaluate_folder, evaluation_targets, target_names
from nnunet_diffusion.evaluation.model_evaluation import (NO_SAMPLER, SPREAD, CaseScore, EvaluationOptions,
                                                          evaluate_models, final_step_rows, prediction_folder,
                                                          summarise)
from nnunet_diffusion.evaluation.report import markdown_table, write_csv, write_json
from nnunet_diffusion.utils import model_folder

TRAIN, RESUME, SKIP = "train", "resume", "skip"
ENSEMBLE_TRAINER = "ensemble"


class TrainingError(RuntimeError):
    """An nnUNetv2_train command failed."""


@dataclass(frozen=True)
class TrainingJob:
    trainer: str
    fold: int | str
    action: str  # TRAIN, RESUME or SKIP
    command: tuple[str, ...]
    fold_folder: Path


def training_action(fold_folder: Path) -> str:
    """SKIP when training finished, RESUME (`--c`) from an intermediate checkpoint, else TRAIN from scratch.

    Mirrors nnU-Net's own `--c` lookup: it continues from checkpoint_final, else _latest, else _best.
    """
    if (fold_folder / "checkpoint_final.pth").is_file():
        return SKIP
    if any((fold_folder / name).is_file() for name in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        return RESUME
    return TRAIN


def check_trainers(trainers: Sequence[str], baseline: str) -> None:
    """Resolve every name with nnU-Net's own lookup before training starts, so that a typo fails in seconds."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_diffusion.trainers.segmentation import nnUNetTrainerDiff
    classes = {}
    for name in dict.fromkeys([*trainers, baseline]):
        try:
            classes[name] = recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            raise ValueError(f"nnU-Net finds no trainer class {name!r} (neither in nnunetv2 nor in "
                             f"nnUNet_extTrainer={os.environ.get(EXT_TRAINER_VARIABLE, '')})") from None
    if issubclass(classes[baseline], nnUNetTrainerDiff):
        raise ValueError(f"--baseline {baseline} is a diffusion trainer; the ensembles need a non-diffusion one, "
                         f"e.g. nnUNetTrainer")


def plan_training(results: Path, dataset: str, configuration: str, plans: str, folds: Sequence[int | str],
                  trainers: Sequence[str], device: str) -> list[TrainingJob]:
    """One job per trainer and fold, each with its action and the nnUNetv2_train command that carries it out."""
    jobs = []
    for trainer in trainers:
        for fold in folds:
            fold_folder = model_folder(results, dataset, trainer, plans, configuration) / f"fold_{fold}"
            action = training_action(fold_folder)
            command = ("nnUNetv2_train", dataset, configuration, str(fold), "-tr", trainer, "-p", plans,
                       "-device", device) + (("--c",) if action == RESUME else ())
            jobs.append(TrainingJob(trainer, fold, action, command, fold_folder))
    return jobs


def run_training(job: TrainingJob, env: dict[str, str]) -> None:
    """Run one nnUNetv2_train command; its output streams to the console and to nnU-Net's log in the fold folder."""
    print(f"{job.action} {job.trainer} fold {job.fold}: {' '.join(job.command)}", flush=True)
    result = subprocess.run(job.command, env=env)
    if result.returncode != 0:
        raise TrainingError(f"{' '.join(job.command)} failed with exit code {result.returncode}; see the training "
                           f"log in {job.fold_folder}")


def ensemble_folders(first: Path, second: Path, cases: Sequence[str], output: Path) -> Path:
    """Average per case the probabilities (.npz) of two prediction folders written with probabilities, with
    nnU-Net's `merge_files` (what `nnUNetv2_ensemble` runs per case), into `output`; the second folder's
    dataset.json and plans.json describe the task. Returns `output`."""
    dataset_json = json.loads((second / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((second / "plans.json").read_text()))
    reader_writer, label_manager = plans_manager.image_reader_writer_class(), plans_manager.get_label_manager(
        dataset_json)
    output.mkdir(parents=True, exist_ok=True)
    for case in cases:
        merge_files([str(first / f"{case}.npz"), str(second / f"{case}.npz")], str(output / case),
                    dataset_json["file_ending"], reader_writer, label_manager)
    return output


def ensemble_with_baseline(evaluation: dict, baseline: str, reference: Path, output: Path,
                           options: EvaluationOptions) -> list[CaseScore]:
    """Per-case scores of every diffusion model averaged with the baseline, per sampler and seed (final step)."""
    baseline_folder = prediction_folder(output, baseline)
    dataset_json = json.loads((baseline_folder / "dataset.json").read_text())
    label_manager = PlansManager(json.loads((baseline_folder / "plans.json").read_text())).get_label_manager(
        dataset_json)
    targets, names = evaluation_targets(label_manager), target_names(dataset_json)
    ending = dataset_json["file_ending"]
    scores = []
    for model in (m["label"] for m in evaluation["models"] if m["diffusion"]):
        label = f"{model} + {baseline}"
        for sampler in options.samplers:
            for seed in options.seeds:
                print(f"ensemble {label}: {sampler} seed {seed}", flush=True)
                folder = ensemble_folders(prediction_folder(output, model, sampler, seed), baseline_folder,
                                          evaluation["cases"], output / "ensembles" / label.replace(" + ", "+") /
                                          sampler / f"seed_{seed}")
                per_case = evaluate_folder(folder, reference, targets, ending)["metric_per_case"]
                scores += [CaseScore(label, ENSEMBLE_TRAINER, sampler, seed, 1, 1,
                                     Path(s["prediction_file"]).name[:-len(ending)], s["metrics"], names)
                           for s in per_case]
    return scores


def ablate(dataset: str, configuration: str, plans: str, trainers: Sequence[str], baseline: str,
           images: Path, reference: Path, output: Path, options: EvaluationOptions) -> dict:
    """Train what is missing, evaluate all, ensemble each diffusion model with the baseline; returns the table."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    results_root = os.environ.get("nnUNet_results")
    if not results_root:
        raise ValueError("nnUNet_results is not set; export it as for nnUNetv2_train")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:  # nnU-Net's "could not find a dataset with the ID ..."
        raise ValueError(str(error)) from None
    check_trainers(trainers, baseline)
    trainers = list(dict.fromkeys([*trainers, baseline]))
    jobs = plan_training(Path(results_root), dataset_name, configuration, plans, options.folds, trainers,
                         options.device)
    env = with_plugin_environment()
    for job in jobs:
        if job.action == SKIP:
            print(f"skip {job.trainer} fold {job.fold}: {job.fold_folder / 'checkpoint_final.pth'} exists")
        else:
            run_training(job, env)
    folders = [model_folder(Path(results_root), dataset_name, t, plans, configuration) for t in trainers]
    evaluation = evaluate_models(folders, images, reference, output, options)
    labels = {m["trainer"]: m["label"] for m in evaluation["models"]}
    ensemble_scores = ensemble_with_baseline(evaluation, labels[baseline], Path(reference), output, options)
    ensemble_summary, _ = summarise(ensemble_scores)
    table = final_step_rows(evaluation["summary"]) + ensemble_summary
    result = {"dataset": dataset_name, "configuration": configuration, "plans": plans, "baseline": baseline,
              "training": [{"trainer": j.trainer, "fold": j.fold, "action": j.action, "command": " ".join(j.command)}
                           for j in jobs],
              "table": table, "ensemble_per_case": [score.as_row() for score in ensemble_scores]}
    write_csv(table, output / "ablation.csv")
    write_json(result, output / "ablation.json")
    (output / "ablation.md").write_text(ablation_markdown(result), encoding="utf-8")
    return result


def ablation_markdown(result: dict) -> str:
    table = result["table"]
    metrics = [c for c in dict.fromkeys(k for row in table for k in row) if c.startswith(("Dice", "HD95"))]
    columns = ["model", "sampler", *metrics] + ([SPREAD] if any(SPREAD in r for r in table) else [])
    rows = [{**r, "sampler": r["sampler"] if r["sampler"] != NO_SAMPLER else "(no diffusion)"} for r in table]
    return (f"# Ablation on {result['dataset']} ({result['configuration']}, {result['plans']})\n\n"
            f"Final-step Dice and HD95 (mm), means over test cases and seeds; `+ {result['baseline']}` rows "
            f"average the probabilities of the two models.\n\n" + markdown_table(rows, columns))
