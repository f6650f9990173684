"""Cross-validation of trainers on a planned dataset: the library behind `nnunet-diffusion crossval` (see that
command's help for what it runs and writes).

A *unit* is one training: a trainer, a repeat (an independent training run with its own results folder and
seed) and a fold of nnU-Net's `splits_final.json`. Every unit is trained with nnU-Net's own loop in a fresh
process, then its fold's held-out cases are predicted with nnU-Net's predictor (every sampling step of a
diffusion model, per sampler and seed) or, where nnU-Net's own fold validation already holds the scores, read
from its `validation/summary.json`. Each finished step leaves a file, so a rerun skips it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from nnunet_diffusion.evaluation.ablation import ENSEMBLE_TRAINER, ensemble_folders
from nnunet_diffusion.evaluation.metrics import evaluate_folder
from nnunet_diffusion.evaluation.model_evaluation import NO_SAMPLER, CaseScore, EvaluationOptions, evaluate_models
from nnunet_diffusion.evaluation.postprocessing import postprocess_folder
from nnunet_diffusion.evaluation.splits import load_or_write_splits
from nnunet_diffusion.evaluation.statistics import common_scored_cases, paired_difference
from nnunet_diffusion.utils import TrainingBudget, markdown_table, model_folder, nanmean

TRAINING_RECORD = "crossval_training.json"
UNIT_RECORD = "unit.json"
POSTPROCESSING_RECORD = "postprocessed.json"
POSTPROCESSED = " (postprocessed)"
# a fold's paired difference gets a bootstrap interval from this many cases on: fewer give too few distinct
# resamples for the interval to say anything
MIN_FOLD_CASES_FOR_INTERVAL = 5


class CrossValidationError(RuntimeError):
    """A training of the cross-validation failed."""


@dataclass(frozen=True)
class Unit:
    """One training: trainer × repeat × fold."""
    trainer: str
    repeat: int
    fold: int

    @property
    def seed(self) -> int:
        """Distinct per repeat and fold, the same on every rerun."""
        return 1000 * self.repeat + self.fold


@dataclass(frozen=True)
class CrossValidation:
    """What to train and how to score it."""
    dataset: str  # nnU-Net's dataset name, DatasetXXX_Name
    configuration: str
    plans: str
    trainers: tuple[str, ...]
    baseline: str
    folds: tuple[int, ...]
    output: Path
    results_root: Path  # the nnUNet_results of repeat 0; repeat r lives in <results_root>/crossval_repeat_<r>
    evaluation: EvaluationOptions
    budget: TrainingBudget | None = None  # None: each trainer's own epochs and iterations
    repeats: int = 1
    repeat_trainers: tuple[str, ...] = ()  # default: every trainer
    repeat_folds: tuple[int, ...] = ()  # default: every fold
    num_folds: int = 5
    group_pattern: str | None = None
    diffusion_trainers: frozenset[str] = field(default_factory=frozenset)
    trainer_epochs: tuple[tuple[str, int], ...] = ()  # (trainer, epochs) instead of the budget's epochs
    postprocessing: bool = False  # also score every final prediction after nnU-Net's postprocessing

    def __post_init__(self):
        if self.baseline in self.diffusion_trainers:
            raise ValueError(f"--baseline {self.baseline} is a diffusion trainer; the ensembles need a non-diffusion "
                             f"one, e.g. nnUNetTrainer")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        stray = sorted(set(self.repeat_trainers) - set(self.all_trainers))
        if stray:
            raise ValueError(f"--repeat-trainers {', '.join(stray)} are not among the compared trainers")
        stray = sorted({t for t, _ in self.trainer_epochs} - set(self.all_trainers))
        if stray:
            raise ValueError(f"--trainer-epochs names {', '.join(stray)}, which are not among the compared trainers")
        if self.trainer_epochs and self.budget is None:
            raise ValueError("--trainer-epochs changes the epochs of the --epochs budget; give --epochs too")
        stray_folds = sorted(set(self.repeat_folds) - set(self.folds))
        if stray_folds:
            raise ValueError(f"--repeat-folds {stray_folds} are not among the folds {list(self.folds)}")

    @property
    def all_trainers(self) -> list[str]:
        """The baseline first (ensembles need it), then the compared trainers in the given order."""
        return list(dict.fromkeys([self.baseline, *self.trainers]))

    def units(self) -> list[Unit]:
        """In the order they are trained: fold by fold, every trainer of repeat 0, then fold by fold the further
        repeats; so an interrupted run leaves whole folds (each with its ensembles) behind."""
        units = [Unit(t, 0, f) for f in self.folds for t in self.all_trainers]
        for repeat in range(1, self.repeats):
            units += [Unit(t, repeat, f) for f in (self.repeat_folds or self.folds)
                      for t in (self.repeat_trainers or self.all_trainers)]
        return units

    def baseline_of(self, unit: Unit) -> Unit:
        """The baseline training a diffusion unit is ensembled with: its own repeat's, else repeat 0's."""
        own = Unit(self.baseline, unit.repeat, unit.fold)
        return own if own in self.units() else Unit(self.baseline, 0, unit.fold)

    def budget_of(self, trainer: str) -> TrainingBudget | None:
        """The budget's iterations, with the trainer's own epochs where --trainer-epochs names it."""
        epochs = dict(self.trainer_epochs).get(trainer)
        return self.budget if epochs is None else replace(self.budget, epochs=epochs)

    def results_of(self, repeat: int) -> Path:
        return self.results_root if repeat == 0 else self.results_root / f"crossval_repeat_{repeat}"

    def fold_folder(self, unit: Unit) -> Path:
        return model_folder(self.results_of(unit.repeat), self.dataset, unit.trainer, self.plans,
                            self.configuration) / f"fold_{unit.fold}"

    def unit_output(self, unit: Unit) -> Path:
        return self.output / "units" / unit.trainer / f"repeat_{unit.repeat}" / f"fold_{unit.fold}"


def _write_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1, default=str))
    partial.replace(path)


def _budget_record(budget: TrainingBudget | None) -> dict | None:
    return None if budget is None else asdict(budget)


def train_unit(cv: CrossValidation, unit: Unit, env: dict[str, str]) -> dict:
    """Train one unit in a fresh process unless its checkpoint_final exists; returns its training record (budget,
    seed, wall clock). A fold trained without this command (e.g. by hand with nnUNetv2_train) counts as trained
    with its trainer's own budget."""
    folder = cv.fold_folder(unit)
    record_file = folder / TRAINING_RECORD
    budget = cv.budget_of(unit.trainer)
    wanted = _budget_record(budget)
    if (folder / "checkpoint_final.pth").is_file():
        record = json.loads(record_file.read_text()) if record_file.is_file() else \
            {"budget": None, "seed": None, "wall_seconds": None, "command": "trained outside nnunet-diffusion crossval"}
        if record["budget"] != wanted:
            raise ValueError(f"{folder} was trained with budget {record['budget'] or 'of its trainer'}, not the "
                             f"requested {wanted or 'of its trainer'}; give the same --epochs/--iterations, another "
                             f"--results-root, or remove that fold folder")
        return record
    command = [sys.executable, "-m", "nnunet_diffusion.runs", cv.dataset, cv.configuration, str(unit.fold),
               unit.trainer, "-p", cv.plans, "-device", cv.evaluation.device, "--seed", str(unit.seed)]
    if budget is not None:
        command += ["--budget", str(budget.epochs), str(budget.iterations), str(budget.val_iterations)]
    log = cv.output / "logs" / f"{unit.trainer}_repeat{unit.repeat}_fold{unit.fold}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"train {unit.trainer} repeat {unit.repeat} fold {unit.fold} (log: {log})", flush=True)
    start = time.time()
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, env={**env, "nnUNet_results": str(cv.results_of(unit.repeat))},
                                stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise CrossValidationError(f"training {unit.trainer} repeat {unit.repeat} fold {unit.fold} failed (exit "
                                   f"{result.returncode}); see {log}")
    record = {"budget": wanted, "seed": unit.seed, "wall_seconds": time.time() - start, "command": " ".join(command)}
    _write_atomically(record_file, record)
    return record


def link_fold_cases(cv: CrossValidation, raw_dataset: Path, reference_folder: Path, fold: int,
                    cases: Sequence[str], file_ending: str) -> tuple[Path, Path]:
    """Folders of links to one fold's held-out images and references, in nnU-Net's naming, for the predictor."""
    root = cv.output / "folds" / f"fold_{fold}"
    images, labels = root / "images", root / "labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        channels = sorted((raw_dataset / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{file_ending}"))
        if not channels:
            raise ValueError(f"{raw_dataset / 'imagesTr'} holds no image of held-out case {case}")
        for source in [*channels, reference_folder / f"{case}{file_ending}"]:
            target = (labels if source.parent == reference_folder else images) / source.name
            if not target.exists():
                target.symlink_to(source.resolve())
    return images, labels


def _read_nnunet_validation(cv: CrossValidation, unit: Unit, cases: Sequence[str], names: dict[str, str],
                            file_ending: str, needs_probabilities: bool) -> list[dict] | None:
    """Per-case rows from nnU-Net's own fold validation of a non-diffusion model, when it scored exactly this
    fold's held-out cases as the requested prediction would (with mirroring, as nnU-Net validates) and left
    probabilities (`nnUNetv2_train --npz`) where the ensembles need them; otherwise None."""
    validation = cv.fold_folder(unit) / "validation"
    summary_file = validation / "summary.json"
    if unit.trainer in cv.diffusion_trainers or not cv.evaluation.use_mirroring or not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    by_case = {Path(c["reference_file"]).name[:-len(file_ending)]: c["metrics"] for c in summary["metric_per_case"]}
    if sorted(by_case) != sorted(cases) or (needs_probabilities and not all(
            (validation / f"{c}.npz").is_file() for c in cases)):
        return None
    # nnU-Net's summary has no HD95
    return [CaseScore(unit.trainer, unit.trainer, NO_SAMPLER, None, 1, 1, case,
                      {k: {"Dice": v["Dice"], "HD95": float("nan")} for k, v in by_case[case].items() if k != "0"},
                      names).as_row() for case in cases]


def _training_curves(fold_folder: Path) -> dict:
    """Pseudo-Dice, training loss and epoch times from nnU-Net's checkpoint log, and the last epoch's training
    loss per diffusion timestep (diffusion trainers write it beside the checkpoint)."""
    import torch
    logging = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    curves = {"pseudo_dice": [float(x) for x in logging["mean_fg_dice"]],
              "train_loss": [float(x) for x in logging["train_losses"]],
              "epoch_seconds": [e - s for s, e in zip(logging["epoch_start_timestamps"],
                                                      logging["epoch_end_timestamps"])]}
    per_timestep = fold_folder / "loss_per_timestep.json"
    if per_timestep.is_file():
        curves["loss_per_timestep"] = json.loads(per_timestep.read_text())["epochs"][-1]["loss"]
    return curves


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


def _read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _unit_options(cv: CrossValidation, unit: Unit) -> EvaluationOptions:
    return replace(cv.evaluation, folds=(unit.fold,), save_probabilities=True)


def _ensemble_file(cv: CrossValidation, diffusion: dict) -> Path:
    return cv.unit_output(Unit(diffusion["trainer"], diffusion["repeat"], diffusion["fold"])) / "ensemble" / \
        "ensemble.json"


def _ensemble_key(diffusion: dict, baseline: dict) -> dict:
    return {"diffusion": diffusion["key"], "baseline": baseline["key"], "baseline_repeat": baseline["repeat"]}


def archived_unit(cv: CrossValidation, unit: Unit, cases: Sequence[str]) -> tuple[dict, list[dict]] | None:
    """The record and derived rows (ensembles, postprocessed) of a unit scored by an earlier run whose training
    folder is gone (a run resumed on another machine from its kept output, without the trainings): taken only when
    every unit of its repeat and fold, and the baseline they are ensembled with, was scored with the current
    options, budget and held-out cases, and every ensemble of that fold from exactly those records; otherwise None
    (train again). Postprocessed rows come along only when the whole fold's postprocessing was kept: a fold scored
    before postprocessing was asked for stands without it rather than being trained again."""
    if (cv.fold_folder(unit) / "checkpoint_final.pth").is_file():
        return None
    group = [u for u in cv.units() if (u.repeat, u.fold) == (unit.repeat, unit.fold)]
    records = {}
    for member in dict.fromkeys([*group, cv.baseline_of(unit)]):
        record = _read_record(cv.unit_output(member) / UNIT_RECORD)
        if record is None or record["key"]["options"] != _as_json(asdict(_unit_options(cv, member))) or \
                record["key"]["cases"] != sorted(cases) or \
                record["training"]["budget"] != _budget_record(cv.budget_of(member.trainer)):
            return None
        records[member] = record
    ensembles = {}
    for member in (u for u in group if u.trainer in cv.diffusion_trainers):
        ensemble = _read_record(_ensemble_file(cv, records[member]))
        if ensemble is None or ensemble["key"] != _ensemble_key(records[member], records[cv.baseline_of(member)]):
            return None
        ensembles[member] = ensemble["per_case"]
    postprocessed = {member: _read_record(_postprocessing_file(cv, records[member])) for member in group} \
        if cv.postprocessing else {}
    complete = all(record is not None and record["key"] == _postprocessing_key(
        records[member], records[cv.baseline_of(member)]) for member, record in postprocessed.items())
    return records[unit], ensembles.get(unit, []) + (postprocessed[unit]["per_case"] if postprocessed and complete
                                                     else [])


def evaluate_unit(cv: CrossValidation, unit: Unit, training: dict, images: Path, labels: Path,
                  cases: Sequence[str], names: dict[str, str], file_ending: str) -> dict:
    """Per-case scores of one unit on its fold's held-out cases (every step, sampler and seed of a diffusion
    model), cached in `units/<trainer>/repeat_<r>/fold_<f>/unit.json` together with what produced them, so a
    rerun with other options or a retrained fold scores again."""
    output = cv.unit_output(unit)
    options = _unit_options(cv, unit)
    key = {"options": asdict(options), "training": training, "cases": sorted(cases)}
    cached = output / UNIT_RECORD
    record = _read_record(cached)
    if record is not None and record["key"] == _as_json(key):
        return record
    needs_probabilities = bool(cv.diffusion_trainers) and unit.trainer == cv.baseline
    start = time.perf_counter()
    rows = _read_nnunet_validation(cv, unit, cases, names, file_ending, needs_probabilities)
    if rows is not None:
        source, predictions = "nnU-Net's fold validation", {NO_SAMPLER: str(cv.fold_folder(unit) / "validation")}
    else:
        print(f"predict {unit.trainer} repeat {unit.repeat} fold {unit.fold}: {len(cases)} held-out case(s)",
              flush=True)
        results = evaluate_models([cv.fold_folder(unit).parent], images, labels, output, options)
        rows, source = results["per_case"], "predicted"
        predictions = {run: str(output / "predictions" / unit.trainer / run) for run in
                       dict.fromkeys(f"{r['sampler']}/seed_{r['seed']}" for r in rows if r["sampler"] != NO_SAMPLER)}
        if not predictions:
            predictions = {NO_SAMPLER: str(output / "predictions" / unit.trainer)}
    runs = max(1, len(predictions))
    record = {"key": key, **asdict(unit), "diffusion": unit.trainer in cv.diffusion_trainers, "source": source,
              "per_case": rows, "predictions": predictions, "training": training,
              "predict_seconds_per_case": (time.perf_counter() - start) / len(cases) / runs if source == "predicted"
              else None, **_training_curves(cv.fold_folder(unit))}
    _write_atomically(cached, record)
    return json.loads(cached.read_text())


def ensemble_unit(cv: CrossValidation, diffusion: dict, baseline: dict, labels: Path, cases: Sequence[str],
                  targets: Sequence, names: dict[str, str], file_ending: str) -> list[dict]:
    """Final-step probabilities of a diffusion unit averaged with its fold's baseline (nnU-Net's `merge_files`),
    per sampler and seed, scored on the held-out cases; cached beside the unit."""
    label = f"{diffusion['trainer']} + {cv.baseline}"
    cached = _ensemble_file(cv, diffusion)
    output = cached.parent
    key = _ensemble_key(diffusion, baseline)
    record = _read_record(cached)
    if record is not None and record["key"] == key:
        return record["per_case"]
    if not Path(baseline["predictions"][NO_SAMPLER]).exists():
        raise CrossValidationError(
            f"the held-out predictions of {cv.baseline} repeat {baseline['repeat']} fold {baseline['fold']} are gone "
            f"(its scores came from an earlier run's output), so {diffusion['trainer']} cannot be ensembled with it; "
            f"remove {cv.unit_output(Unit(cv.baseline, baseline['repeat'], baseline['fold']))} to train it again")
    rows = []
    for run, folder in diffusion["predictions"].items():
        sampler, seed = run.split("/seed_")
        merged = ensemble_folders(Path(baseline["predictions"][NO_SAMPLER]), Path(folder), cases, output / run)
        rows += [CaseScore(label, ENSEMBLE_TRAINER, sampler, int(seed), 1, 1,
                           Path(score["prediction_file"]).name[:-len(file_ending)], score["metrics"], names).as_row()
                 for score in evaluate_folder(merged, labels, targets, file_ending)["metric_per_case"]]
    _write_atomically(cached, {"key": key, "per_case": rows})
    return rows


def _postprocessing_file(cv: CrossValidation, record: dict) -> Path:
    return cv.unit_output(Unit(record["trainer"], record["repeat"], record["fold"])) / POSTPROCESSING_RECORD


def _postprocessing_key(record: dict, baseline: dict) -> dict:
    return {"unit": record["key"], "ensemble": _ensemble_key(record, baseline) if record["diffusion"] else None}


def postprocess_unit(cv: CrossValidation, record: dict, baseline: dict, labels: Path, cases: Sequence[str],
                     targets: Sequence, names: dict[str, str], plans: dict, dataset_json: dict) -> list[dict]:
    """Every final prediction of a unit and of its ensembles after nnU-Net's postprocessing, decided on the fold's
    held-out cases as `nnUNetv2_determine_postprocessing` decides it; rows `<model> (postprocessed)`, cached
    beside the unit with what nnU-Net chose."""
    cached = _postprocessing_file(cv, record)
    key = _postprocessing_key(record, baseline)
    previous = _read_record(cached)
    if previous is not None and previous["key"] == key:
        return previous["per_case"]
    folders = {(record["trainer"], record["trainer"], run): Path(f) for run, f in record["predictions"].items()}
    if record["diffusion"]:
        folders.update({(f"{record['trainer']} + {cv.baseline}", ENSEMBLE_TRAINER, run):
                        _ensemble_file(cv, record).parent / run for run in record["predictions"]})
    rows, chosen = [], {}
    for (model, trainer, run), folder in folders.items():
        sampler, seed = (NO_SAMPLER, None) if run == NO_SAMPLER else run.split("/seed_")
        scratch = cached.parent / "postprocessing" / model.replace(" + ", "+")
        scores, chosen[f"{model} {run}"] = postprocess_folder(
            folder, cases, labels, plans, dataset_json, targets, scratch if run == NO_SAMPLER else scratch / run)
        rows += [CaseScore(model + POSTPROCESSED, trainer, sampler, None if seed is None else int(seed), 1, 1,
                           Path(score["prediction_file"]).name[:-len(dataset_json["file_ending"])],
                           score["metrics"], names).as_row() for score in scores]
    _write_atomically(cached, {"key": key, "chosen": chosen, "per_case": rows})
    return rows


def _final_rows(units: Sequence[dict], derived: Sequence[dict]) -> list[dict]:
    """Each prediction's last step, tagged with its repeat and fold, and the derived rows (ensembles and
    postprocessed predictions, one step each, already tagged)."""
    rows = [{**r, "repeat": u["repeat"], "fold": u["fold"]} for u in units for r in u["per_case"]
            if r["step"] == r["steps"]]
    return rows + list(derived)


def _groups(rows: Sequence[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def case_scores(rows: Sequence[dict], column: str = "Dice") -> dict[str, float]:
    """One score per case: the mean over sampling seeds within a training, then over repeated trainings."""
    per_training = {k: nanmean([r[column] for r in g]) for k, g in _groups(rows, "case", "repeat").items()}
    return {case: nanmean([v for (c, _), v in per_training.items() if c == case])
            for case in dict.fromkeys(c for c, _ in per_training)}


def summarise_cross_validation(cv: CrossValidation, units: Sequence[dict], derived: Sequence[dict]) -> dict:
    """Tables of the runs so far (`derived`: the rows of ensembles and postprocessed predictions): per model and
    sampler, per step, seed spread, paired differences, curves, time."""
    final = _final_rows(units, derived)
    class_columns = [c for c in dict.fromkeys(k for r in final for k in r) if c.startswith("Dice ")]
    table = []
    groups = sorted(_groups(final, "model", "sampler").items(), key=lambda g: g[0][0].endswith(POSTPROCESSED))
    for (model, sampler), rows in groups:  # postprocessed rows after all others
        scores = case_scores(rows)
        training_means = {k: nanmean([r["Dice"] for r in g]) for k, g in _groups(rows, "fold", "repeat").items()}
        run_sds = [float(np.std(v, ddof=1)) for fold in dict.fromkeys(f for f, _ in training_means)
                   if len(v := [m for (f, _), m in training_means.items() if f == fold]) > 1]
        values = np.array([v for v in scores.values() if not np.isnan(v)])
        table.append({"model": model, "sampler": sampler, "trainings": len(training_means), "cases": len(scores),
                      "Dice": float(values.mean()), "Dice_sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                      **{c: nanmean(list(case_scores(rows, c).values())) for c in class_columns},
                      "HD95": nanmean(list(case_scores(rows, "HD95").values())),
                      "run_sd": float(np.mean(run_sds)) if run_sds else None})
    per_step, seed_spread = [], []
    all_rows = [{**r, "repeat": u["repeat"], "fold": u["fold"]} for u in units if u["diffusion"] for r in u["per_case"]]
    for (model, sampler, step), rows in _groups(all_rows, "model", "sampler", "step").items():
        per_step.append({"model": model, "sampler": sampler, "step": step,
                         "Dice": nanmean(list(case_scores(rows).values()))})
        spreads = [max(d) - min(d) for g in _groups(rows, "case", "repeat", "fold").values()
                   if len(d := [r["Dice"] for r in g if not np.isnan(r["Dice"])]) > 1]
        if spreads:
            seed_spread.append({"model": model, "sampler": sampler, "step": step, "seeds": len(
                {r["seed"] for r in rows}), "max_delta_dice": float(np.mean(spreads)),
                "max_delta_dice_largest": float(np.max(spreads))})
    scores = {(r["model"], r["sampler"]): case_scores(rows) for r, rows in
              ((rows[0], rows) for rows in _groups(final, "model", "sampler").values())}
    fold_of = {r["case"]: r["fold"] for r in final}
    fold_means = [{"model": model, "sampler": sampler, "fold": fold, "cases": len(fold_scores := case_scores(rows)),
                   "Dice": nanmean(list(fold_scores.values()))}
                  for (model, sampler, fold), rows in _groups(final, "model", "sampler", "fold").items()]
    return {"table": table, "fold_means": fold_means, "per_step": per_step, "seed_spread": seed_spread,
            "differences": _differences(cv, scores, fold_of), "curves": _curves(units), "timing": _timing(units)}


def comparison_pairs(cv: CrossValidation) -> list[tuple[str, str]]:
    """A − B pairs the paper's claims need: each diffusion trainer against the baseline, later trainers against
    earlier ones in the given order (e.g. Recycle − Diff when Diff comes first), and each ensemble against both
    of its members; with postprocessing, the same pairs again after it."""
    diffusion = [t for t in cv.trainers if t in cv.diffusion_trainers]
    others = [t for t in cv.trainers if t not in cv.diffusion_trainers and t != cv.baseline]
    pairs = [(t, cv.baseline) for t in [*others, *diffusion]]
    pairs += [(later, earlier) for i, earlier in enumerate(diffusion) for later in diffusion[i + 1:]]
    for t in diffusion:
        pairs += [(f"{t} + {cv.baseline}", cv.baseline), (f"{t} + {cv.baseline}", t)]
    return pairs + [(a + POSTPROCESSED, b + POSTPROCESSED) for a, b in pairs if cv.postprocessing]


def fold_differences(scores_a: dict[str, float], scores_b: dict[str, float], fold_of: dict[str, int]
                     ) -> list[dict]:
    """A − B on each fold's common cases: whether a difference holds from one training to the next, which the
    interval over all cases cannot tell when trainings differ more than cases. A fold gets an interval and a
    signed-rank p only when it holds MIN_FOLD_CASES_FOR_INTERVAL cases; otherwise its mean alone."""
    per_fold: dict[int, list[str]] = {}
    for case in common_scored_cases(scores_a, scores_b):
        per_fold.setdefault(fold_of[case], []).append(case)
    out = []
    for fold, cases in sorted(per_fold.items()):
        a, b = ({c: scores[c] for c in cases} for scores in (scores_a, scores_b))
        row = {k: v for k, v in paired_difference("A", "B", a, b).as_row().items() if k not in ("a", "b")} \
            if len(cases) >= MIN_FOLD_CASES_FOR_INTERVAL else \
            {"cases": len(cases), "mean": float(np.mean([a[c] - b[c] for c in cases]))}
        out.append({"fold": fold, **row})
    return out


def _differences(cv: CrossValidation, scores: dict[tuple[str, str], dict[str, float]], fold_of: dict[str, int]
                 ) -> list[dict]:
    """Paired per-case differences of the final predictions, per sampler (a model without one pairs with each),
    with the same difference fold by fold and the number of folds on which A is ahead."""
    samplers = list(cv.evaluation.samplers)
    out, pairs_done = [], set()
    for a, b in comparison_pairs(cv):
        for sampler in samplers:
            key_a = (a, sampler) if (a, sampler) in scores else (a, NO_SAMPLER)
            key_b = (b, sampler) if (b, sampler) in scores else (b, NO_SAMPLER)
            if key_a not in scores or key_b not in scores or (key_a, key_b) in pairs_done:
                continue
            pairs_done.add((key_a, key_b))
            one_pass = key_a[1] == key_b[1] == NO_SAMPLER
            per_fold = fold_differences(scores[key_a], scores[key_b], fold_of)
            out.append({**paired_difference(a, b, scores[key_a], scores[key_b]).as_row(),
                        "sampler": NO_SAMPLER if one_pass else sampler,
                        "folds_a_better": sum(int(d["mean"] > 0) for d in per_fold), "folds": len(per_fold),
                        "per_fold": per_fold})
    return out


def _curves(units: Sequence[dict]) -> list[dict]:
    """Per trainer, means over its trainings: validation pseudo-Dice and training loss per epoch, and the last
    epoch's training loss per diffusion timestep."""
    curves = []
    for (trainer,), group in _groups(units, "trainer").items():
        epochs = min(len(u["pseudo_dice"]) for u in group)
        entry = {"trainer": trainer, "trainings": len(group),
                 "pseudo_dice": np.mean([u["pseudo_dice"][:epochs] for u in group], 0).tolist(),
                 "train_loss": np.mean([u["train_loss"][:epochs] for u in group], 0).tolist()}
        per_t = [u["loss_per_timestep"] for u in group if "loss_per_timestep" in u]
        if per_t:
            entry["loss_per_timestep"] = [nanmean([float("nan") if v[t] is None else v[t] for v in per_t])
                                          for t in range(len(per_t[0]))]
        curves.append(entry)
    return curves


def _timing(units: Sequence[dict]) -> list[dict]:
    """Wall clock as a user sees it: the training process (start-up, augmentation workers, all epochs), an
    epoch, and the prediction of one held-out case per sampler run (all steps exported and scored)."""
    rows = []
    for (trainer,), group in _groups(units, "trainer").items():
        wall = [u["training"]["wall_seconds"] for u in group if u["training"]["wall_seconds"] is not None]
        predict = [u["predict_seconds_per_case"] for u in group if u["predict_seconds_per_case"] is not None]
        rows.append({"trainer": trainer, "trainings": len(group),
                     "training_seconds": float(np.median(wall)) if wall else None,
                     "epoch_seconds": float(np.median([e for u in group for e in u["epoch_seconds"]])),
                     "predict_seconds_per_case": float(np.median(predict)) if predict else None})
    return rows


def _fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(d: dict) -> str:
    return f"[{_fmt(d['interval_low'], signed=True)}, {_fmt(d['interval_high'], signed=True)}]"


def _per_fold_markdown(summary: dict) -> list[str]:
    """The fold-by-fold tables of results.md (none for a single fold): each model's mean Dice per fold, and each
    paired difference per fold with its interval where the fold holds enough cases."""
    folds = sorted({r["fold"] for r in summary["fold_means"]})
    if len(folds) < 2:
        return []
    means = {(r["model"], r["sampler"], r["fold"]): r["Dice"] for r in summary["fold_means"]}
    differences = []
    for d in summary["differences"]:
        cells = {f["fold"]: _fmt(f["mean"], signed=True) + (f" {_interval(f)}" if "interval_low" in f else "")
                 for f in d["per_fold"]}
        differences.append([f"{d['a']} − {d['b']}", d["sampler"], *(cells.get(f, "") for f in folds)])
    return ["", "## Fold by fold", "",
            "Each fold is a separate training of every model: mean Dice of the fold's held-out cases (averaged over "
            "sampling seeds and repeated trainings), then A − B on the fold's cases with a 95 % bootstrap interval "
            f"where the fold holds at least {MIN_FOLD_CASES_FOR_INTERVAL} cases.", "",
            markdown_table(["model", "sampler", *(f"fold {f}" for f in folds)],
                           [[r["model"], r["sampler"], *(_fmt(means.get((r["model"], r["sampler"], f)))
                                                         for f in folds)] for r in summary["table"]]), "",
            markdown_table(["A − B", "sampler", *(f"fold {f}" for f in folds)], differences)]


def cross_validation_markdown(cv: CrossValidation, summary: dict, splits: Sequence[dict]) -> str:
    """results.md: the tables of `summary` with the settings that produced them."""
    budget = "each trainer's own epochs and iterations" if cv.budget is None else \
        f"{cv.budget.epochs} epochs × {cv.budget.iterations} iterations ({cv.budget.val_iterations} validation " \
        f"batches per epoch)" + "".join(f"; {t}: {e} epochs" for t, e in cv.trainer_epochs)
    options = cv.evaluation
    lines = [f"# Cross-validation on {cv.dataset} ({cv.configuration}, {cv.plans})", "",
             f"{len(splits)}-fold split of `splits_final.json`, folds {', '.join(map(str, cv.folds))}"
             + (f", cases grouped by `{cv.group_pattern}`" if cv.group_pattern else "")
             + f"; {cv.repeats} training run(s) per unit"
             + (f" (repeats for {', '.join(cv.repeat_trainers or cv.all_trainers)} on folds "
                f"{', '.join(map(str, cv.repeat_folds or cv.folds))})" if cv.repeats > 1 else "")
             + f". Budget: {budget}. Prediction: {'with' if options.use_mirroring else 'no'} mirroring, "
             f"samplers {', '.join(options.samplers)}, seeds {', '.join(map(str, options.seeds))}, "
             f"{options.steps or 'T'} steps.", "",
             "## Held-out Dice", "",
             "Each case's Dice (foreground mean; per class in the named columns) is averaged over sampling seeds "
             "and repeated trainings, then over cases (± sd over cases). `run sd`: the sd of a fold's mean Dice "
             "between repeated trainings, averaged over the folds trained more than once. Diffusion models at "
             "their last step; `+` rows average the probabilities of the two models (nnU-Net's ensembling)."
             + (f" `{POSTPROCESSED.strip()}` rows: the same predictions after nnU-Net's postprocessing (the largest "
                "connected component of the foreground, then of each class, kept where it raises the fold's Dice, "
                "as `nnUNetv2_determine_postprocessing` decides), decided fold by fold." if cv.postprocessing
                else ""), ""]
    class_columns = [c for c in dict.fromkeys(k for r in summary["table"] for k in r) if c.startswith("Dice ")]
    lines.append(markdown_table(["model", "sampler", "trainings", "cases", "Dice", *class_columns, "HD95", "run sd"],
                        [[r["model"], r["sampler"], r["trainings"], r["cases"],
                          f"{_fmt(r['Dice'])} ± {_fmt(r['Dice_sd'])}", *(_fmt(r.get(c)) for c in class_columns),
                          _fmt(r["HD95"], 2), _fmt(r["run_sd"])] for r in summary["table"]]))
    lines += ["", "## Paired differences", "",
              "A − B per held-out case (final predictions), mean, 95 % bootstrap interval over cases, Wilcoxon "
              "signed-rank p (two-sided), the cases where A scored higher and the folds where A's mean over the "
              "fold's cases is higher (each fold is a separate training, so this shows whether the difference "
              "survives the spread between trainings); *within noise* when the interval contains 0.", ""]
    lines.append(markdown_table(["A − B", "sampler", "cases", "mean", "95 % interval", "p", "A higher",
                                 "folds A higher", "reading"],
                        [[f"{d['a']} − {d['b']}", d["sampler"], d["cases"], _fmt(d["mean"], signed=True),
                          _interval(d), f"{d['p_signed_rank']:.2g}", f"{d['a_better']}/{d['cases']}",
                          f"{d['folds_a_better']}/{d['folds']}",
                          ("A better" if d["mean"] > 0 else "B better") if d["separated"] else "within noise"]
                         for d in summary["differences"]]))
    lines += _per_fold_markdown(summary)
    if summary["per_step"]:
        steps = max(r["step"] for r in summary["per_step"])
        runs = _groups(summary["per_step"], "model", "sampler")
        lines += ["", "## Dice per sampling step", "",
                  markdown_table(["model", "sampler", *range(1, steps + 1)],
                         [[m, s, *(_fmt(r["Dice"]) for r in sorted(g, key=lambda r: r["step"]))]
                          for (m, s), g in runs.items()])]
    if summary["seed_spread"]:
        steps = max(r["step"] for r in summary["seed_spread"])
        runs = _groups(summary["seed_spread"], "model", "sampler")
        lines += ["", "## Largest Dice difference across sampling seeds per step", "",
                  "Per case, max − min Dice over the seeds; mean over cases (largest case in brackets).", "",
                  markdown_table(["model", "sampler", "seeds", *range(1, steps + 1)],
                         [[m, s, g[0]["seeds"], *(f"{r['max_delta_dice']:.4f} ({r['max_delta_dice_largest']:.3f})"
                                                  for r in sorted(g, key=lambda r: r["step"]))]
                          for (m, s), g in runs.items()])]
    epochs = max(len(c["pseudo_dice"]) for c in summary["curves"])
    shown = sorted({0, epochs - 1, *range(0, epochs, max(1, epochs // 10))})
    lines += ["", "## Training", "", "Validation pseudo-Dice (nnU-Net's online estimate) per epoch, mean over "
              "trainings (`pseudo_dice.png`):", "",
              markdown_table(["trainer", *(e + 1 for e in shown)],
                     [[c["trainer"], *(_fmt(c["pseudo_dice"][e]) if e < len(c["pseudo_dice"]) else "" for e in shown)]
                      for c in summary["curves"]])]
    per_t = [c for c in summary["curves"] if "loss_per_timestep" in c]
    if per_t:
        steps = max(len(c["loss_per_timestep"]) for c in per_t)
        lines += ["", "Training x0 cross-entropy per timestep t in the last epoch (t = 0 least noise):", "",
                  markdown_table(["trainer", *(f"t={t}" for t in range(steps))],
                         [[c["trainer"], *(_fmt(v) for v in c["loss_per_timestep"])] for c in per_t])]
    lines += ["", "Wall clock (median per training run): the training process as `nnUNetv2_train` runs it "
              "(without its final validation), one epoch, and the prediction of one held-out case per sampler "
              "run (every step exported and scored):", "",
              markdown_table(["trainer", "trainings", "training (s)", "epoch (s)", "predict per case (s)"],
                     [[t["trainer"], t["trainings"], _fmt(t["training_seconds"], 0), _fmt(t["epoch_seconds"], 1),
                       _fmt(t["predict_seconds_per_case"], 1)] for t in summary["timing"]])]
    return "\n".join(lines) + "\n"


def plot_cross_validation(summary: dict, output: Path) -> list[Path]:
    """pseudo_dice.png (per epoch), dice_vs_step_<sampler>.png (non-diffusion models drawn flat, as reference),
    loss_per_timestep.png."""
    from nnunet_diffusion.evaluation.report import plot_metric_vs_step
    written = [plot_metric_vs_step({c["trainer"]: c["pseudo_dice"] for c in summary["curves"]}, "pseudo-Dice",
                                   output / "pseudo_dice.png", xlabel="epoch")]
    for (sampler,), rows in _groups(summary["per_step"], "sampler").items():
        curves = {m: [r["Dice"] for r in sorted(g, key=lambda r: r["step"])]
                  for (m,), g in _groups(rows, "model").items()}
        steps = max(len(c) for c in curves.values())
        curves.update({f"{r['model']} (no diffusion)": [r["Dice"]] * steps for r in summary["table"]
                       if r["sampler"] == NO_SAMPLER and not r["model"].endswith(POSTPROCESSED)})
        written.append(plot_metric_vs_step(curves, f"held-out Dice ({sampler})", output / f"dice_vs_step_{sampler}.png"))
    per_t = {c["trainer"]: c["loss_per_timestep"] for c in summary["curves"] if "loss_per_timestep" in c}
    if per_t:
        written.append(plot_metric_vs_step(per_t, "training x0 cross-entropy", output / "loss_per_timestep.png",
                                           xlabel="timestep t + 1"))
    return written


def dataset_cases(preprocessed_dataset: Path, file_ending: str) -> list[str]:
    """The dataset's training cases: nnU-Net's copies of their references in `gt_segmentations`."""
    references = preprocessed_dataset / "gt_segmentations"
    cases = sorted(p.name[:-len(file_ending)] for p in references.glob(f"*{file_ending}"))
    if not cases:
        raise ValueError(f"{references} holds no '*{file_ending}' reference; run nnUNetv2_plan_and_preprocess first")
    return cases


def run_cross_validation(cv: CrossValidation, raw_dataset: Path, preprocessed_dataset: Path) -> dict:
    """Train what is missing, score every unit and ensemble, and rewrite results.json / results.md / plots after
    each unit, so that an interrupted run leaves the tables of what finished."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_diffusion.environment import with_plugin_environment
    from nnunet_diffusion.evaluation.metrics import evaluation_targets, target_names
    from nnunet_diffusion.evaluation.report import write_csv, write_json

    dataset_json = json.loads((preprocessed_dataset / "dataset.json").read_text())
    file_ending = dataset_json["file_ending"]
    plans_file = preprocessed_dataset / f"{cv.plans}.json"
    if not plans_file.is_file():
        raise ValueError(f"{plans_file} does not exist; plan the dataset (and derive {cv.plans}) first")
    plans_manager = PlansManager(str(plans_file))
    if cv.configuration not in plans_manager.available_configurations:
        raise ValueError(f"{plans_file} has no configuration {cv.configuration!r} "
                         f"(it has {', '.join(plans_manager.available_configurations)})")
    targets = evaluation_targets(plans_manager.get_label_manager(dataset_json))
    names = target_names(dataset_json)
    cases = dataset_cases(preprocessed_dataset, file_ending)
    splits = load_or_write_splits(preprocessed_dataset, cases, cv.num_folds, cv.group_pattern)
    missing = [f for f in cv.folds if f >= len(splits)]
    if missing:
        raise ValueError(f"folds {missing} do not exist: {preprocessed_dataset / 'splits_final.json'} holds "
                         f"{len(splits)}")
    env = with_plugin_environment()
    units, derived = [], []
    summary: dict = {}
    for unit in cv.units():
        held_out = splits[unit.fold]["val"]
        images, labels = link_fold_cases(cv, raw_dataset, preprocessed_dataset / "gt_segmentations", unit.fold,
                                         held_out, file_ending)
        archived = archived_unit(cv, unit, held_out)
        if archived is not None:
            record, rows = archived
        else:
            training = train_unit(cv, unit, env)
            record = evaluate_unit(cv, unit, training, images, labels, held_out, names, file_ending)
            baseline = cv.baseline_of(unit)
            baseline_record = record if unit == baseline else next(
                u for u in units if (u["trainer"], u["repeat"], u["fold"]) == (baseline.trainer, baseline.repeat,
                                                                               baseline.fold))
            rows = ensemble_unit(cv, record, baseline_record, labels, held_out, targets, names, file_ending) \
                if record["diffusion"] else []
            if cv.postprocessing:
                rows += postprocess_unit(cv, record, baseline_record, labels, held_out, targets, names,
                                         plans_manager.plans, dataset_json)
        units.append(record)
        derived += [{**r, "repeat": unit.repeat, "fold": unit.fold} for r in rows]
        summary = summarise_cross_validation(cv, units, derived)
        result = {"dataset": cv.dataset, "configuration": cv.configuration, "plans": cv.plans,
                  "baseline": cv.baseline, "budget": _budget_record(cv.budget),
                  "trainer_epochs": dict(cv.trainer_epochs), "options": asdict(cv.evaluation),
                  "folds": list(cv.folds), "repeats": cv.repeats, "group_pattern": cv.group_pattern,
                  "postprocessing": cv.postprocessing,
                  "splits": splits, "units": [{k: v for k, v in u.items() if k != "per_case"} for u in units],
                  **summary}
        write_json(result, cv.output / "results.json")
        write_csv([{**r, "repeat": u["repeat"], "fold": u["fold"]} for u in units for r in u["per_case"]] + derived,
                  cv.output / "per_case.csv")
        (cv.output / "results.md").write_text(cross_validation_markdown(cv, summary, splits), encoding="utf-8")
        plot_cross_validation(summary, cv.output)
    return summary
