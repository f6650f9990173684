"""What a comparison does with one trained unit: score its held-out cases (every step, sampler and seed of a
diffusion model), ensemble it with its fold's baseline, and score both after nnU-Net's postprocessing. Each
result is cached beside the unit (`unit.json`, `ensemble/ensemble.json`, `postprocessed.json`) with what
produced it, so a rerun with the same settings skips it and one with other settings scores again."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from nnunet_diffusion.evaluation.ensembles import ENSEMBLE_TRAINER, ensemble_folders
from nnunet_diffusion.evaluation.metrics import evaluate_folder
from nnunet_diffusion.evaluation.model_evaluation import NO_SAMPLER, CaseScore, evaluate_models
from nnunet_diffusion.evaluation.options import EvaluationOptions
from nnunet_diffusion.evaluation.postprocessing import postprocess_folder
from nnunet_diffusion.evaluation.study import HeldOut, Study, Unit
from nnunet_diffusion.training import read_record

UNIT_RECORD = "unit.json"
POSTPROCESSING_RECORD = "postprocessed.json"
POSTPROCESSED = " (postprocessed)"


class ComparisonError(RuntimeError):
    """A training or prediction of a comparison failed, or what it needs is gone."""


def write_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1, default=str))
    partial.replace(path)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


def budget_record(study: Study, trainer: str) -> dict | None:
    budget = study.budget_of(trainer)
    return None if budget is None else asdict(budget)


def training_record(study: Study, unit: Unit) -> dict:
    """The runner's record of a finished unit; a fold trained outside the plugin (by hand with nnUNetv2_train)
    counts as trained with its trainer's own budget."""
    return read_record(study.fold_folder(unit)) or {"budget": None, "seed": None, "wall_seconds": None,
                                                    "command": "trained outside nnunet-diffusion"}


def unit_options(study: Study, unit: Unit) -> EvaluationOptions:
    return replace(study.evaluation, folds=(unit.fold,), save_probabilities=True)


def same_options(stored: dict, options: EvaluationOptions) -> bool:
    """Whether cached scores were made with these options; the device is left out, so that a command run where
    no GPU is (a login node's `--report-only`) still finds the scores that the GPU jobs made."""
    current = _as_json(asdict(options))
    return {k: v for k, v in stored.items() if k != "device"} == {k: v for k, v in current.items() if k != "device"}


def scored_record(study: Study, unit: Unit, cases: Sequence[str]) -> dict | None:
    """The cached scores of a unit when they were made from its current training with the current options."""
    record = read_json(study.unit_output(unit) / UNIT_RECORD)
    if record is None or not (study.fold_folder(unit) / "checkpoint_final.pth").is_file():
        return None
    key = record["key"]
    fits = same_options(key["options"], unit_options(study, unit)) and key["cases"] == sorted(cases) and \
        key["training"] == _as_json(training_record(study, unit))
    return record if fits else None


def _read_nnunet_validation(study: Study, unit: Unit, cases: Sequence[str], names: dict[str, str],
                            file_ending: str, needs_probabilities: bool) -> list[dict] | None:
    """Per-case rows from nnU-Net's own fold validation of a non-diffusion model, when it scored exactly these
    held-out cases as the requested prediction would (with mirroring, as nnU-Net validates) and left
    probabilities (`nnUNetv2_train --npz`) where the ensembles need them; otherwise None."""
    validation = study.fold_folder(unit) / "validation"
    summary_file = validation / "summary.json"
    if unit.trainer in study.diffusion_trainers or not study.evaluation.use_mirroring or not summary_file.is_file():
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


def training_curves(fold_folder: Path) -> dict:
    """Pseudo-Dice, training loss and epoch times from nnU-Net's checkpoint log, and the last epoch's training
    loss per diffusion timestep (diffusion trainers write it beside the checkpoint)."""
    from nnunet_diffusion.training import epoch_seconds, training_log
    logging = training_log(fold_folder / "checkpoint_final.pth")
    curves = {"pseudo_dice": [float(x) for x in logging["mean_fg_dice"]],
              "train_loss": [float(x) for x in logging["train_losses"]], "epoch_seconds": epoch_seconds(logging)}
    per_timestep = fold_folder / "loss_per_timestep.json"
    if per_timestep.is_file():
        curves["loss_per_timestep"] = json.loads(per_timestep.read_text())["epochs"][-1]["loss"]
    return curves


def evaluate_unit(study: Study, unit: Unit, held_out: HeldOut, names: dict[str, str], file_ending: str) -> dict:
    """Per-case scores of one trained unit on its held-out cases (every step, sampler and seed of a diffusion
    model), cached in `units/<trainer>/repeat_<r>/fold_<f>/unit.json` with what produced them."""
    cached = scored_record(study, unit, held_out.cases)
    if cached is not None:
        return cached
    output = study.unit_output(unit)
    options = unit_options(study, unit)
    training = training_record(study, unit)
    key = {"options": asdict(options), "training": training, "cases": sorted(held_out.cases)}
    needs_probabilities = bool(study.diffusion_trainers) and unit.trainer == study.baseline
    start = time.perf_counter()
    rows = _read_nnunet_validation(study, unit, held_out.cases, names, file_ending, needs_probabilities)
    if rows is not None:
        source, predictions = "nnU-Net's fold validation", {NO_SAMPLER: str(study.fold_folder(unit) / "validation")}
    else:
        print(f"predict {unit}: {len(held_out.cases)} held-out case(s)", flush=True)
        results = evaluate_models([study.fold_folder(unit).parent], held_out.images, held_out.labels, output, options)
        rows, source = results["per_case"], "predicted"
        predictions = {run: str(output / "predictions" / unit.trainer / run) for run in
                       dict.fromkeys(f"{r['sampler']}/seed_{r['seed']}" for r in rows if r["sampler"] != NO_SAMPLER)}
        if not predictions:
            predictions = {NO_SAMPLER: str(output / "predictions" / unit.trainer)}
    runs = max(1, len(predictions))
    record = {"key": key, **asdict(unit), "diffusion": unit.trainer in study.diffusion_trainers, "source": source,
              "per_case": rows, "predictions": predictions, "training": training,
              "predict_seconds_per_case": (time.perf_counter() - start) / len(held_out.cases) / runs
              if source == "predicted" else None, **training_curves(study.fold_folder(unit))}
    write_atomically(output / UNIT_RECORD, record)
    return json.loads((output / UNIT_RECORD).read_text())


def ensemble_file(study: Study, record: dict) -> Path:
    return study.unit_output(Unit(record["trainer"], record["repeat"], record["fold"])) / "ensemble" / "ensemble.json"


def ensemble_key(diffusion: dict, baseline: dict) -> dict:
    return {"diffusion": diffusion["key"], "baseline": baseline["key"], "baseline_repeat": baseline["repeat"]}


def ensemble_unit(study: Study, diffusion: dict, baseline: dict, held_out: HeldOut, targets: Sequence,
                  names: dict[str, str], file_ending: str) -> list[dict]:
    """Final-step probabilities of a diffusion unit averaged with its fold's baseline (nnU-Net's `merge_files`),
    per sampler and seed, scored on the held-out cases; cached beside the unit."""
    label = f"{diffusion['trainer']} + {study.baseline}"
    cached = ensemble_file(study, diffusion)
    key = ensemble_key(diffusion, baseline)
    record = read_json(cached)
    if record is not None and record["key"] == key:
        return record["per_case"]
    if not Path(baseline["predictions"][NO_SAMPLER]).exists():
        raise ComparisonError(
            f"the held-out predictions of {study.baseline} repeat {baseline['repeat']} fold {baseline['fold']} are "
            f"gone (its scores came from an earlier run's output), so {diffusion['trainer']} cannot be ensembled "
            f"with it; remove {study.unit_output(Unit(study.baseline, baseline['repeat'], baseline['fold']))} to "
            f"train it again")
    rows = []
    for run, folder in diffusion["predictions"].items():
        sampler, seed = run.split("/seed_")
        merged = ensemble_folders(Path(baseline["predictions"][NO_SAMPLER]), Path(folder), held_out.cases,
                                  cached.parent / run)
        rows += [CaseScore(label, ENSEMBLE_TRAINER, sampler, int(seed), 1, 1,
                           Path(score["prediction_file"]).name[:-len(file_ending)], score["metrics"], names).as_row()
                 for score in evaluate_folder(merged, held_out.labels, targets, file_ending)["metric_per_case"]]
    write_atomically(cached, {"key": key, "per_case": rows})
    return rows


def postprocessing_file(study: Study, record: dict) -> Path:
    return study.unit_output(Unit(record["trainer"], record["repeat"], record["fold"])) / POSTPROCESSING_RECORD


def postprocessing_key(record: dict, baseline: dict) -> dict:
    return {"unit": record["key"], "ensemble": ensemble_key(record, baseline) if record["diffusion"] else None}


def postprocess_unit(study: Study, record: dict, baseline: dict, held_out: HeldOut, targets: Sequence,
                     names: dict[str, str], plans: dict, dataset_json: dict) -> list[dict]:
    """Every final prediction of a unit and of its ensembles after nnU-Net's postprocessing, decided on the
    held-out cases as `nnUNetv2_determine_postprocessing` decides it; rows `<model> (postprocessed)`, cached
    beside the unit with what nnU-Net chose."""
    cached = postprocessing_file(study, record)
    key = postprocessing_key(record, baseline)
    previous = read_json(cached)
    if previous is not None and previous["key"] == key:
        return previous["per_case"]
    folders = {(record["trainer"], record["trainer"], run): Path(f) for run, f in record["predictions"].items()}
    if record["diffusion"]:
        folders.update({(f"{record['trainer']} + {study.baseline}", ENSEMBLE_TRAINER, run):
                        ensemble_file(study, record).parent / run for run in record["predictions"]})
    rows, chosen = [], {}
    for (model, trainer, run), folder in folders.items():
        sampler, seed = (NO_SAMPLER, None) if run == NO_SAMPLER else run.split("/seed_")
        scratch = cached.parent / "postprocessing" / model.replace(" + ", "+")
        scores, chosen[f"{model} {run}"] = postprocess_folder(
            folder, held_out.cases, held_out.labels, plans, dataset_json, targets,
            scratch if run == NO_SAMPLER else scratch / run)
        rows += [CaseScore(model + POSTPROCESSED, trainer, sampler, None if seed is None else int(seed), 1, 1,
                           Path(score["prediction_file"]).name[:-len(dataset_json["file_ending"])],
                           score["metrics"], names).as_row() for score in scores]
    write_atomically(cached, {"key": key, "chosen": chosen, "per_case": rows})
    return rows


def archived_unit(study: Study, unit: Unit, cases: Sequence[str]) -> tuple[dict, list[dict]] | None:
    """The record and derived rows (ensembles, postprocessed) of a unit scored by an earlier run whose training
    folder is gone (a run resumed on another machine from its kept output, without the trainings): taken only when
    every unit of its repeat and fold, and the baseline they are ensembled with, was scored with the current
    options, budget and held-out cases, and every ensemble of that fold from exactly those records; otherwise None
    (train again). Postprocessed rows come along only when the whole fold's postprocessing was kept."""
    if (study.fold_folder(unit) / "checkpoint_final.pth").is_file():
        return None
    group = [u for u in study.units() if (u.repeat, u.fold) == (unit.repeat, unit.fold)]
    records = {}
    for member in dict.fromkeys([*group, study.baseline_of(unit)]):
        record = read_json(study.unit_output(member) / UNIT_RECORD)
        if record is None or not same_options(record["key"]["options"], unit_options(study, member)) or \
                record["key"]["cases"] != sorted(cases) or \
                record["training"]["budget"] != budget_record(study, member.trainer):
            return None
        records[member] = record
    ensembles = {}
    for member in (u for u in group if u.trainer in study.diffusion_trainers):
        ensemble = read_json(ensemble_file(study, records[member]))
        if ensemble is None or ensemble["key"] != ensemble_key(records[member], records[study.baseline_of(member)]):
            return None
        ensembles[member] = ensemble["per_case"]
    postprocessed = {member: read_json(postprocessing_file(study, records[member])) for member in group} \
        if study.postprocessing else {}
    complete = all(record is not None and record["key"] == postprocessing_key(
        records[member], records[study.baseline_of(member)]) for member, record in postprocessed.items())
    return records[unit], ensembles.get(unit, []) + (postprocessed[unit]["per_case"] if postprocessed and complete
                                                     else [])
