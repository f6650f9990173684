"""`nnunet-diffusion ablate`: train what is missing with the stock nnUNetv2_train, then compare every trainer.

For each trainer and fold, the model folder decides: `checkpoint_final.pth` (nnU-Net writes it only when
training ended) → skip; `checkpoint_latest.pth` or `checkpoint_best.pth` → resume with `--c`; nothing → train.
The baseline (default: the stock `nnUNetTrainer`) is always included. All models are then evaluated as by
`nnunet-diffusion evaluate` (per step, sampler and seed, with the final step's probabilities kept), and every
diffusion model is also ensembled with the baseline by averaging probabilities with nnU-Net's own ensembling
(`nnunetv2.ensembling.ensemble.merge_files`, what `nnUNetv2_ensemble` runs per case), for each sampler and seed.

Written to the output folder: `ablation.csv/json/md` (one row per model or ensemble and sampler: means over
cases and seeds of the final prediction), the outputs of `evaluate` (per-step tables and plots), and the
ensembles' segmentations under `ensembles/`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value, with_plugin_environment
from nnunet_diffusion.evaluation.evaluate import (NO_SAMPLER, SPREAD, EvaluationOptions, add_prediction_arguments,
                                                  case_row, evaluate_models, final_step_rows, options_from_args,
                                                  prediction_folder, summarise)
from nnunet_diffusion.evaluation.metrics import evaluate_folder
from nnunet_diffusion.evaluation.report import markdown_table, write_csv, write_json
from nnunet_diffusion.evaluation.sampling_runs import evaluation_targets, target_names

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


def model_folder(results: Path, dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    return results / dataset / f"{trainer}__{plans}__{configuration}"


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


def ensemble_with_baseline(evaluation: dict, baseline: str, reference: Path, output: Path,
                           options: EvaluationOptions) -> list[dict]:
    """Per-case rows of every diffusion model averaged with the baseline, per sampler and seed (final step)."""
    baseline_folder = prediction_folder(output, baseline)
    dataset_json = json.loads((baseline_folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((baseline_folder / "plans.json").read_text()))
    label_manager = plans_manager.get_label_manager(dataset_json)
    reader_writer = plans_manager.image_reader_writer_class()
    targets, names = evaluation_targets(label_manager), target_names(dataset_json)
    ending = dataset_json["file_ending"]
    rows = []
    for model in (m["label"] for m in evaluation["models"] if m["diffusion"]):
        label = f"{model} + {baseline}"
        for sampler in options.samplers:
            for seed in options.seeds:
                print(f"ensemble {label}: {sampler} seed {seed}", flush=True)
                diffusion_folder = prediction_folder(output, model, sampler, seed)
                folder = output / "ensembles" / label.replace(" + ", "+") / sampler / f"seed_{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                for case in evaluation["cases"]:
                    merge_files([str(diffusion_folder / f"{case}.npz"), str(baseline_folder / f"{case}.npz")],
                                str(folder / case), ending, reader_writer, label_manager)
                scores = evaluate_folder(folder, reference, targets, ending)["metric_per_case"]
                rows += [case_row(label, ENSEMBLE_TRAINER, sampler, seed, 1, 1, Path(s["prediction_file"]).name[
                    :-len(ending)], s["metrics"], names) for s in scores]
    return rows


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
    ensemble_rows = ensemble_with_baseline(evaluation, labels[baseline], Path(reference), output, options)
    ensemble_summary, _ = summarise(ensemble_rows)
    table = final_step_rows(evaluation["summary"]) + ensemble_summary
    result = {"dataset": dataset_name, "configuration": configuration, "plans": plans, "baseline": baseline,
              "training": [{"trainer": j.trainer, "fold": j.fold, "action": j.action, "command": " ".join(j.command)}
                           for j in jobs],
              "table": table, "ensemble_per_case": ensemble_rows}
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, as for nnUNetv2_train")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer classes to compare")
    parser.add_argument("--baseline", default="nnUNetTrainer",
                        help="non-diffusion trainer, always trained and ensembled with each diffusion trainer")
    parser.add_argument("-i", "--images", required=True, help="test images, nnU-Net naming (<case>_0000.nii.gz)")
    parser.add_argument("-r", "--reference", required=True, help="reference segmentations (<case>.nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="folder for tables, plots and predictions")
    add_prediction_arguments(parser)
    args = parser.parse_args(argv)
    os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()  # so that the in-process predictor finds our trainers
    try:
        ablate(args.dataset, args.configuration, args.plans, args.trainers, args.baseline, Path(args.images),
               Path(args.reference), Path(args.output), options_from_args(args, save_probabilities=True))
    except (ValueError, TrainingError) as error:
        raise SystemExit(f"nnunet-diffusion ablate: {error}") from None
    print(f"wrote {Path(args.output) / 'ablation.md'}, ablation.csv, ablation.json")
    return 0
