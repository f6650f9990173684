"""Dice and HD95 of trained models per sampling step, seed and sampler: the library behind `nnunet-diffusion
evaluate` (see that command's help for the files it writes) and `ablate`."""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.evaluation.metrics import evaluate_case, evaluation_targets, target_names
from nnunet_diffusion.evaluation.options import EvaluationOptions
from nnunet_diffusion.evaluation.model_folders import (Case, ModelFolder, check_reference_geometry, check_same_task,
                                                       find_cases, read_model_folder)
from nnunet_diffusion.evaluation.report import (plot_dice_vs_time, records_table, plot_metric_vs_step, write_csv,
                                                write_json)
from nnunet_diffusion.evaluation.step_prediction import (StepPredictor, diffusion_network, export, load_predictor,
                                                        predict_steps, preprocess)
from nnunet_diffusion.evaluation.seeds import seed_spread
from nnunet_diffusion.utils import nanmean

NO_SAMPLER = "-"  # the sampler column of stock (non-diffusion) models
SPREAD = "max_delta_dice"


def model_labels(models: Sequence[ModelFolder]) -> list[str]:
    """Trainer names when they identify the models (same plans and configuration), else full folder names."""
    trainers = [m.trainer for m in models]
    return trainers if len(set(trainers)) == len(trainers) else [m.path.name for m in models]


def prediction_folder(output: Path, label: str, sampler: str = NO_SAMPLER, seed: int | None = None) -> Path:
    """Where the final-step predictions of one model (and, for diffusion, one sampler and seed) are written."""
    folder = Path(output) / "predictions" / label
    return folder if sampler == NO_SAMPLER else folder / sampler / f"seed_{seed}"


def evaluate_models(model_folders: Sequence[str | Path], images: str | Path, reference: str | Path,
                    output: str | Path, options: EvaluationOptions) -> dict:
    """Predict and score every model, write the tables and plots, and return what results.json holds.

    All inputs are checked before anything is predicted: one dataset and label set, every fold's checkpoint,
    images and references one to one, and in the same geometry.
    """
    output = Path(output)
    models = [read_model_folder(f, options.folds, options.checkpoint) for f in model_folders]
    if not models:
        raise ValueError("no model folders given")
    check_same_task(models)
    dataset_json = models[0].dataset_json
    cases = find_cases(images, dataset_json["file_ending"], len(dataset_json["channel_names"]), reference)
    check_reference_geometry(cases)
    names = target_names(dataset_json)
    labels = model_labels(models)
    per_case, early_exit, per_k, described = [], [], [], []
    for position, (model, label) in enumerate(zip(models, labels), 1):
        predictor = load_predictor(model, options.folds, options.checkpoint, torch.device(options.device),
                                   options.use_mirroring)
        rows, early, k_rows = _evaluate_model(predictor, label, cases, output, options, names,
                                              f"[{position}/{len(models)}] {label}")
        per_case += rows
        early_exit += early
        per_k += k_rows
        described.append({"label": label, "folder": str(model.path), "trainer": model.trainer,
                          "diffusion": diffusion_network(predictor) is not None, "steps": rows[-1].steps})
    summary, spread_rows = summarise(per_case)
    early_summary = summarise_early_exit(early_exit)
    results = {"options": asdict(options), "dataset": models[0].dataset, "images": str(images),
               "reference": str(reference), "cases": [c.name for c in cases], "models": described,
               "summary": summary, "per_case": [score.as_row() for score in per_case], "seed_spread": spread_rows,
               "early_exit": early_summary, "per_k": summarise_per_k(per_k + _early_exit_as_per_k(early_exit))}
    write_outputs(results, output)
    return results


def _evaluate_model(predictor: StepPredictor, label: str, cases: Sequence[Case], output: Path,
                    options: EvaluationOptions, names: dict[str, str],
                    prefix: str) -> tuple[list[CaseScore], list[dict], list[dict]]:
    """Per-case scores of one model for every (sampler, seed) run and step, its early-exit rows and per-K rows."""
    network = diffusion_network(predictor)
    targets = evaluation_targets(predictor.label_manager)
    runs = [(NO_SAMPLER, None)] if network is None else [(s, seed) for s in options.samplers for seed in options.seeds]
    steps = 1 if network is None else _steps(network, options.steps, predictor)
    folders = {run: _prediction_folder_with_metadata(predictor, prediction_folder(output, label, *run)) for run in runs}
    rows, early, per_k = [], [], []
    with tempfile.TemporaryDirectory(prefix="nnunet_diffusion_steps_") as scratch:
        for i, case in enumerate(cases, 1):
            data, properties = preprocess(predictor, case)

            def score(logits: torch.Tensor, folder: Path, save_probabilities: bool = False) -> dict:
                file = export(predictor, logits, properties, folder / case.name, save_probabilities)
                return evaluate_case(file, case.reference, targets)["metrics"]

            for j, (sampler, seed) in enumerate(runs, 1):
                where = f"{prefix}: case {i}/{len(cases)} {case.name}"
                if network is None:
                    print(f"{where}: one pass", flush=True)
                    start = time.perf_counter()
                    step_logits = [predictor.predict_logits_from_preprocessed_data(data)]
                    seconds = time.perf_counter() - start
                    if options.per_k:
                        per_k.append({"model": label, "sampler": sampler, "seed": seed, "case": case.name,
                                      "K": 1, "run": "one pass", "mean_steps_used": 1.0, "seconds": seconds,
                                      "Dice": None})
                else:
                    print(f"{where}: {sampler} seed {seed} ({j}/{len(runs)}), {steps} steps", flush=True)
                    step_logits, _ = predict_steps(predictor, data, SamplerSettings(sampler, steps, seed))
                for k, logits in enumerate(step_logits, 1):  # the last step is the prediction: keep it
                    metrics = score(logits, folders[sampler, seed], options.save_probabilities) \
                        if k == steps else score(logits, Path(scratch))
                    rows.append(CaseScore(label, predictor.trainer_name, sampler, seed, k, steps, case.name,
                                          metrics, names))
                if network is not None and options.early_exit is not None:
                    print(f"{where}: {sampler} seed {seed}, early exit at tolerance {options.early_exit}", flush=True)
                    settings = SamplerSettings(sampler, steps, seed, options.early_exit)
                    start = time.perf_counter()
                    exit_logits, steps_used = predict_steps(predictor, data, settings)
                    seconds = time.perf_counter() - start
                    metrics = score(exit_logits[-1], Path(scratch))
                    early.append({"model": label, "sampler": sampler, "seed": seed, "case": case.name,
                                  "tolerance": options.early_exit, "steps": steps,
                                  "mean_steps_used": float(np.mean(steps_used)), "Dice_full": rows[-1].dice,
                                  "Dice_early_exit": nanmean([m["Dice"] for m in metrics.values()]),
                                  "seconds": seconds})
                if options.per_k:
                    if network is None:
                        per_k[-1]["Dice"] = rows[-1].dice
                    else:
                        per_k += [_per_k_row(predictor, data, label, sampler, seed, case.name, k, score, scratch)
                                  for k in range(1, steps + 1)]
    return rows, early, per_k


def _per_k_row(predictor: StepPredictor, data: torch.Tensor, label: str, sampler: str, seed: int | None, case: str,
               k: int, score, scratch: str) -> dict:
    """One separate K-step run of a diffusion model on one case: Dice and predict time."""
    start = time.perf_counter()
    step_logits, _ = predict_steps(predictor, data, SamplerSettings(sampler, k, seed))
    seconds = time.perf_counter() - start
    metrics = score(step_logits[-1], Path(scratch))
    return {"model": label, "sampler": sampler, "seed": seed, "case": case, "K": k, "run": f"K = {k}",
            "mean_steps_used": float(k), "seconds": seconds, "Dice": nanmean([m["Dice"] for m in metrics.values()])}


def _early_exit_as_per_k(rows: Sequence[dict]) -> list[dict]:
    return [{"model": r["model"], "sampler": r["sampler"], "seed": r["seed"], "case": r["case"], "K": r["steps"],
             "run": f"early exit {r['tolerance']}", "mean_steps_used": r["mean_steps_used"], "seconds": r["seconds"],
             "Dice": r["Dice_early_exit"]} for r in rows]


def summarise_per_k(rows: Sequence[dict]) -> list[dict]:
    """Per (model, sampler, run): mean Dice, steps used and predict seconds per case over cases and seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["sampler"], row["run"]), []).append(row)
    return [{"model": model, "sampler": sampler, "run": run, "K": group[0]["K"],
             "mean_steps_used": float(np.mean([r["mean_steps_used"] for r in group])),
             "Dice": nanmean([r["Dice"] for r in group]),
             "seconds_per_case": float(np.mean([r["seconds"] for r in group]))}
            for (model, sampler, run), group in groups.items()]


def _steps(network, requested: int | None, predictor: StepPredictor) -> int:
    """The steps to sample: `--steps`, else the model's default (what plain `nnUNetv2_predict` runs)."""
    if requested is None:
        return network.default_sampling.steps
    if not 1 <= requested <= network.num_timesteps:
        raise ValueError(f"--steps {requested} is outside 1..{network.num_timesteps}: {predictor.trainer_name} was "
                         f"trained with {network.num_timesteps} timesteps")
    return requested


def _prediction_folder_with_metadata(predictor: StepPredictor, folder: Path) -> Path:
    """A prediction folder holding dataset.json and plans.json, as nnUNetv2_predict writes (nnUNetv2_ensemble
    reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(predictor.dataset_json, indent=2))
    (folder / "plans.json").write_text(json.dumps(predictor.plans_manager.plans, indent=2))
    return folder


@dataclass(frozen=True)
class CaseScore:
    """The scores of one case in one prediction: of a model (or ensemble), sampler, seed and sampling step."""
    model: str
    trainer: str
    sampler: str
    seed: int | None
    step: int
    steps: int
    case: str
    metrics: dict  # nnU-Net's per-target metrics: {key: {"Dice": ..., "HD95": ...}}
    names: dict[str, str]  # metric key → label name

    @property
    def dice(self) -> float:
        """Mean Dice over the foreground targets."""
        return nanmean([m["Dice"] for m in self.metrics.values()])

    def as_row(self) -> dict:
        """The flat row of per_case.csv: foreground means and, per label or region (by name), Dice and HD95."""
        row = {"model": self.model, "trainer": self.trainer, "sampler": self.sampler,
               "seed": "" if self.seed is None else self.seed, "step": self.step, "steps": self.steps,
               "case": self.case, "Dice": self.dice, "HD95": nanmean([m["HD95"] for m in self.metrics.values()])}
        for key, values in self.metrics.items():
            row[f"Dice {self.names.get(key, key)}"] = values["Dice"]
            row[f"HD95 {self.names.get(key, key)}"] = values["HD95"]
        return row


def summarise(scores: Sequence[CaseScore]) -> tuple[list[dict], list[dict]]:
    """Means over cases and seeds per (model, sampler, step), with the seed spread per step; and per-case spreads."""
    per_case = [score.as_row() for score in scores]
    metric_columns = [c for c in dict.fromkeys(k for row in per_case for k in row) if c.startswith(("Dice", "HD95"))]
    groups: dict[tuple, list[dict]] = {}
    for row in per_case:
        groups.setdefault((row["model"], row["sampler"], row["step"]), []).append(row)
    summary = []
    for (model, sampler, step), rows in groups.items():
        summary.append({"model": model, "trainer": rows[0]["trainer"], "sampler": sampler, "step": step,
                        "steps": rows[0]["steps"], "seeds": len({r["seed"] for r in rows}),
                        "cases": len({r["case"] for r in rows}),
                        **{c: nanmean([r[c] for r in rows if c in r]) for c in metric_columns}})
    spread_rows = []
    for model, sampler in dict.fromkeys((r["model"], r["sampler"]) for r in per_case):
        rows = [r for r in per_case if r["model"] == model and r["sampler"] == sampler]
        seeds = list(dict.fromkeys(r["seed"] for r in rows))
        if sampler == NO_SAMPLER or len(seeds) < 2:
            continue
        cases = list(dict.fromkeys(r["case"] for r in rows))
        dice = np.full((len(seeds), len(cases), rows[0]["steps"]), np.nan)
        for r in rows:
            dice[seeds.index(r["seed"]), cases.index(r["case"]), r["step"] - 1] = r["Dice"]
        spread = seed_spread(dice)
        for row in summary:
            if row["model"] == model and row["sampler"] == sampler:
                row[SPREAD] = float(spread.per_step[row["step"] - 1])
        spread_rows += [{"model": model, "sampler": sampler, "case": case, "step": step + 1, "seeds": len(seeds),
                         SPREAD: float(spread.per_case_step[c, step])}
                        for c, case in enumerate(cases) for step in range(dice.shape[2])]
    return summary, spread_rows


def summarise_early_exit(rows: Sequence[dict]) -> list[dict]:
    """Per (model, sampler): mean steps a network call ran, and the Dice it costs against the full K steps."""
    summary = []
    for model, sampler in dict.fromkeys((r["model"], r["sampler"]) for r in rows):
        group = [r for r in rows if r["model"] == model and r["sampler"] == sampler]
        full, early = nanmean([r["Dice_full"] for r in group]), nanmean([r["Dice_early_exit"] for r in group])
        summary.append({"model": model, "sampler": sampler, "tolerance": group[0]["tolerance"],
                        "steps": group[0]["steps"], "mean_steps_used": float(np.mean([r["mean_steps_used"]
                                                                                       for r in group])),
                        "Dice_full": full, "Dice_early_exit": early, "Dice_cost": full - early,
                        "seconds_per_case": float(np.mean([r["seconds"] for r in group]))})
    return summary


def write_outputs(results: dict, output: Path) -> None:
    """CSV, JSON, Markdown and the per-step plots of an evaluation."""
    summary = results["summary"]
    write_csv(summary, output / "results.csv")
    write_csv(results["per_case"], output / "per_case.csv")
    if results["seed_spread"]:
        write_csv(results["seed_spread"], output / "seed_spread.csv")
    if results["early_exit"]:
        write_csv(results["early_exit"], output / "early_exit.csv")
    if results["per_k"]:
        write_csv(results["per_k"], output / "per_k.csv")
        print(f"wrote {plot_dice_vs_time(results['per_k'], output / 'dice_vs_predict_time.png')}")
    write_json(results, output / "results.json")
    (output / "results.md").write_text(results_markdown(results), encoding="utf-8")
    for png in plot_steps(summary, output):
        print(f"wrote {png}")


def final_step_rows(summary: Sequence[dict]) -> list[dict]:
    """The rows that are each run's prediction (step K of K; stock models have one step)."""
    return [r for r in summary if r["step"] == r["steps"]]


def results_markdown(results: dict) -> str:
    summary = results["summary"]
    final = final_step_rows(summary)
    metric_columns = [c for c in final[0] if c.startswith(("Dice", "HD95"))]
    columns = ["model", "sampler", "steps", *metric_columns] + ([SPREAD] if any(SPREAD in r for r in final) else [])
    text = (f"# Evaluation of {len(results['models'])} model(s) on {len(results['cases'])} case(s)\n\n"
            f"Images `{results['images']}`, reference `{results['reference']}`; means over cases and seeds "
            f"(seeds {', '.join(map(str, results['options']['seeds']))}). HD95 in mm.\n\n"
            f"## Final step\n\n" + records_table(final, columns))
    diffusion = [r for r in summary if r["sampler"] != NO_SAMPLER]
    if diffusion:
        for title, column in (("Dice per sampling step", "Dice"), ("Max ΔDice across seeds per step", SPREAD)):
            table = _per_step_table(diffusion, column)
            if table:
                text += f"\n## {title}\n\n" + table
    if results["early_exit"]:
        text += "\n## Early exit\n\n" + records_table(results["early_exit"], list(results["early_exit"][0]))
    if results["per_k"]:
        text += ("\n## Dice and predict time per number of steps\n\nSeparate runs per K; seconds per case in "
                 "this process (preprocessing excluded)\n\n" + records_table(results["per_k"],
                                                                              list(results["per_k"][0])))
    return text


def _per_step_table(rows: Sequence[dict], column: str) -> str:
    runs: dict[tuple[str, str], dict] = {}
    for row in rows:
        if column in row:
            runs.setdefault((row["model"], row["sampler"]), {"model": row["model"], "sampler": row["sampler"]})[
                str(row["step"])] = row[column]
    if not runs:
        return ""
    steps = max(r["steps"] for r in rows)
    return records_table(list(runs.values()), ["model", "sampler", *map(str, range(1, steps + 1))])


def plot_steps(summary: Sequence[dict], output: Path) -> list[Path]:
    """Dice vs step per sampler (stock models drawn flat, as reference), and ΔDice vs step where seeds vary."""
    diffusion = [r for r in summary if r["sampler"] != NO_SAMPLER]
    if not diffusion:
        return []
    stock = [r for r in summary if r["sampler"] == NO_SAMPLER]
    steps = max(r["steps"] for r in diffusion)
    written = []
    for sampler in dict.fromkeys(r["sampler"] for r in diffusion):
        rows = [r for r in diffusion if r["sampler"] == sampler]
        dice = {model: [r["Dice"] for r in rows if r["model"] == model] for model in dict.fromkeys(r["model"]
                                                                                                   for r in rows)}
        dice.update({f"{r['model']} (no diffusion)": [r["Dice"]] * steps for r in stock})
        written.append(plot_metric_vs_step(dice, f"mean Dice ({sampler})", output / f"dice_vs_step_{sampler}.png"))
        spread = {model: [r[SPREAD] for r in rows if r["model"] == model] for model in dice
                  if any(r["model"] == model and SPREAD in r for r in rows)}
        if spread:
            written.append(plot_metric_vs_step(spread, f"max ΔDice across seeds ({sampler})",
                                               output / f"delta_dice_vs_step_{sampler}.png"))
    return written
