"""A comparison from its plan to its report: what each unit needs next, the inline run (one unit after another
under the command), and the finishing step that ensembles, postprocesses, summarises and writes results.json,
per_case.csv, results.md and the plots from whatever has been scored. `scheduling.py` runs the same units as
jobs; `crossval` and `ablate` differ only in the held-out cases."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value
from nnunet_diffusion.evaluation.splits import load_or_write_splits
from nnunet_diffusion.evaluation.study import HeldOut, Study, Unit, dataset_cases, link_fold_cases
from nnunet_diffusion.evaluation.summary import summarise
from nnunet_diffusion.evaluation.unit_scoring import (ComparisonError, archived_unit, ensemble_unit, evaluate_unit,
                                                      postprocess_unit, scored_record)
from nnunet_diffusion.training import FINISHED, NEW, check_fold_folder, run_arguments, training_state

SCORED, ARCHIVED, TO_PREDICT, TO_RESUME, TO_TRAIN = "finished", "kept", "to predict", "to resume", "to train"


@dataclass(frozen=True)
class Comparison:
    """A study and where its data are: nnU-Net's raw and preprocessed dataset folders and, for a comparison on a
    test folder (`ablate`), its images and references. Picklable, so that a job can rebuild what it needs."""
    study: Study
    raw_dataset: Path
    preprocessed_dataset: Path
    test_images: Path | None = None
    test_labels: Path | None = None

    def prepare(self) -> Prepared:
        """Read the plans and labels, write or read the split, and link each fold's held-out cases."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_diffusion.evaluation.metrics import evaluation_targets, target_names
        study = self.study
        dataset_json = json.loads((self.preprocessed_dataset / "dataset.json").read_text())
        file_ending = dataset_json["file_ending"]
        plans_file = self.preprocessed_dataset / f"{study.plans}.json"
        if not plans_file.is_file():
            raise ValueError(f"{plans_file} does not exist; plan the dataset (and derive {study.plans}) first")
        plans_manager = PlansManager(str(plans_file))
        if study.configuration not in plans_manager.available_configurations:
            raise ValueError(f"{plans_file} has no configuration {study.configuration!r} "
                             f"(it has {', '.join(plans_manager.available_configurations)})")
        if self.test_images is not None:
            from nnunet_diffusion.evaluation.model_folders import find_cases
            cases = find_cases(self.test_images, file_ending, len(dataset_json["channel_names"]), self.test_labels)
            test = HeldOut(self.test_images, self.test_labels, tuple(c.name for c in cases))
            splits, held_out = [], {fold: test for fold in study.folds}
        else:
            splits = load_or_write_splits(self.preprocessed_dataset, dataset_cases(self.preprocessed_dataset,
                                                                                   file_ending),
                                          study.num_folds, study.group_pattern)
            missing = [f for f in study.folds if f >= len(splits)]
            if missing:
                raise ValueError(f"folds {missing} do not exist: {self.preprocessed_dataset / 'splits_final.json'} "
                                 f"holds {len(splits)}")
            held_out = {fold: link_fold_cases(study.output, self.raw_dataset, self.preprocessed_dataset /
                                              "gt_segmentations", fold, splits[fold]["val"], file_ending)
                        for fold in study.folds}
        for fold in study.folds if splits and study.train_cases is not None else ():
            if study.train_cases > len(splits[fold]["train"]):
                raise ValueError(f"--train-cases {study.train_cases}: fold {fold} holds {len(splits[fold]['train'])} "
                                 f"training case(s); give numbers from 1 to {len(splits[fold]['train'])}")
        for unit in study.units():
            weights = study.pretrained_weights_of(unit)
            if weights and not Path(weights).is_file() and training_state(study.fold_folder(unit)) == NEW:
                raise ValueError(f"--pretrained-weights of {unit.trainer}, fold {unit.fold}: {weights} does not "
                                 f"exist; pretrain that fold first (e.g. nnUNetv2_train … -tr "
                                 f"nnUNetTrainerDiffPretrain) or give the checkpoint's path")
        return Prepared(self, dataset_json, plans_manager.plans, evaluation_targets(
            plans_manager.get_label_manager(dataset_json)), target_names(dataset_json), splits, held_out)


@dataclass
class Prepared:
    comparison: Comparison
    dataset_json: dict
    plans: dict
    targets: list
    names: dict[str, str]
    splits: list[dict]
    held_out: dict[int, HeldOut]
    archived: dict[Unit, tuple[dict, list[dict]] | None] = field(default_factory=dict)

    @property
    def study(self) -> Study:
        return self.comparison.study

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    def kept(self, unit: Unit) -> tuple[dict, list[dict]] | None:
        if unit not in self.archived:
            self.archived[unit] = archived_unit(self.study, unit, self.held_out[unit.fold].cases)
        return self.archived[unit]

    def status(self, unit: Unit) -> str:
        """What the unit needs next; a fold folder of other settings is refused here, before any job starts."""
        if self.kept(unit) is not None:
            return ARCHIVED
        state = check_fold_folder(self.study.training_run(unit))
        if state == FINISHED:
            return SCORED if scored_record(self.study, unit, self.held_out[unit.fold].cases) else TO_PREDICT
        return TO_TRAIN if state == NEW else TO_RESUME

    def score(self, unit: Unit) -> dict:
        return evaluate_unit(self.study, unit, self.held_out[unit.fold], self.names, self.file_ending)


def job_environment(study: Study, unit: Unit) -> dict[str, str]:
    """What a training process must find before it imports nnU-Net: the unit's results root and the plugin."""
    return {"nnUNet_results": str(study.results_of(unit.repeat)), EXT_TRAINER_VARIABLE: ext_trainer_value()}


def train_in_fresh_process(study: Study, unit: Unit, save_every: int | None) -> None:
    """The inline executor's training: the runner in a fresh process (nnU-Net's state and memory start clean),
    its output in the unit's `jobs/train_inline.log`."""
    import os
    run = study.training_run(unit, save_every)
    command = [sys.executable, "-m", "nnunet_diffusion.training", *run_arguments(run)]
    log = study.unit_output(unit) / "jobs" / "train_inline.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"train {unit} (log: {log})", flush=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, env={**os.environ, **job_environment(study, unit)}, stdout=out,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        raise ComparisonError(f"training {unit} failed (exit {result.returncode}); see {log}")


def run_inline(prepared: Prepared, save_every: int | None = None) -> dict:
    """Every unit in order under this command: train (or resume) in a fresh process, score, and rewrite the
    report after each unit, so that an interrupted run leaves the tables of what finished."""
    summary: dict = {}
    for unit in prepared.study.units():
        status = prepared.status(unit)
        if status in (TO_TRAIN, TO_RESUME):
            train_in_fresh_process(prepared.study, unit, save_every)
        if status != ARCHIVED:
            prepared.score(unit)
        summary = finish(prepared)
    return summary


def finish(prepared: Prepared) -> dict:
    """Ensembles and postprocessing of every scored unit whose baseline is scored, then the summary and the
    report files of all that exists, with what is missing listed."""
    from nnunet_diffusion.evaluation.report import write_csv, write_json
    from nnunet_diffusion.evaluation.results_page import plot_results, results_markdown
    study = prepared.study
    records: dict[Unit, dict] = {}
    derived, missing = [], []
    for unit in study.units():
        kept = prepared.kept(unit)
        record = kept[0] if kept else scored_record(study, unit, prepared.held_out[unit.fold].cases)
        if record is None:
            missing.append(f"{unit}: {prepared.status(unit)}")
            continue
        records[unit] = record
        rows = list(kept[1]) if kept else []
        baseline = records.get(study.baseline_of(unit))
        if not kept and baseline is not None:
            held_out = prepared.held_out[unit.fold]
            if record["diffusion"]:
                rows += ensemble_unit(study, record, baseline, held_out, prepared.targets, prepared.names,
                                      prepared.file_ending)
            if study.postprocessing:
                rows += postprocess_unit(study, record, baseline, held_out, prepared.targets, prepared.names,
                                         prepared.plans, prepared.dataset_json)
        derived += [{**r, "repeat": unit.repeat, "fold": unit.fold} for r in rows]
    if not records:
        print("nothing is scored yet: " + "; ".join(missing), flush=True)
        return {}
    units = list(records.values())
    summary = summarise(study, units, derived)
    result = {"dataset": study.dataset, "configuration": study.configuration, "plans": study.plans,
              "baseline": study.baseline, "budget": None if study.budget is None else asdict(study.budget),
              "trainer_epochs": dict(study.trainer_epochs),
              "options": asdict(study.evaluation), "folds": list(study.folds), "repeats": study.repeats,
              "group_pattern": study.group_pattern, "postprocessing": study.postprocessing, "margin": study.margin,
              "held_out": "test folder" if study.test_folder else "folds", "splits": prepared.splits,
              "missing": missing, "units": [{k: v for k, v in u.items() if k != "per_case"} for u in units], **summary}
    write_json(result, study.output / "results.json")
    write_csv([{**r, "repeat": u["repeat"], "fold": u["fold"]} for u in units for r in u["per_case"]] + derived,
              study.output / "per_case.csv")
    (study.output / "results.md").write_text(results_markdown(study, summary, prepared.splits, missing),
                                             encoding="utf-8")
    plot_results(summary, study.output)
    if study.train_cases is not None:  # one point of a learning curve: redraw the curve with it
        from nnunet_diffusion.evaluation.learning_curve import write_learning_curve
        write_learning_curve(study.output.parent)
    return summary
