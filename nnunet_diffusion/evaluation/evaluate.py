"""`nnunet-diffusion evaluate`: Dice and HD95 of trained models on a test set, per sampling step, seed and sampler.

Models are nnUNetv2_train output folders of any trainer, ours or stock. A stock model is predicted once; a
diffusion model is predicted once per sampler and seed, and every sampling step's x0 is scored (Fu et al. report
Dice per step, and the max ΔDice across 5 seeds per step). With a fixed seed the sampling trajectory is
deterministic, so step K of these runs is exactly what `nnUNetv2_predict` writes with the same
`nnUNet_diffusion_sampler/steps/seed`. Written to the output folder:

- `results.csv`: mean over cases and seeds per model, sampler and step (foreground mean and per class; with ≥ 2
  seeds also `max_delta_dice`, the per-case max − min Dice across seeds averaged over cases)
- `per_case.csv`, `seed_spread.csv` (per case and step)
- `early_exit.csv` (with --early-exit TOL): per model and sampler, the mean number of steps a network call ran
  (each sliding-window tile and mirror stops on its own), the Dice lost against the full K steps, and the predict
  time per case
- `per_k.csv` and `dice_vs_predict_time.png` (with --per-k): per model and sampler, Dice and predict time per case
  of separate runs with K = 1 … T steps (step k of a K-step run is not a k-step run), the early-exit run, and the
  stock models' one pass: the trade-off a user picks from
- `results.json` (all of the above and the settings), `results.md` (tables for a README)
- `dice_vs_step_<sampler>.png`, `delta_dice_vs_step_<sampler>.png`
- `predictions/<model>[/<sampler>/seed_<s>]/`: the final-step segmentations (with --save-probabilities also
  nnU-Net's .npz/.pkl, so that `nnUNetv2_ensemble` can combine them)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.core.scheduler import SAMPLERS
from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value
from nnunet_diffusion.evaluation.metrics import evaluate_case
from nnunet_diffusion.evaluation.report import (markdown_table, plot_dice_vs_time, plot_metric_vs_step, write_csv,
                                                write_json)
from nnunet_diffusion.evaluation.sampling_runs import (Case, ModelFolder, StepPredictor, check_reference_geometry,
                                                       check_same_task, diffusion_network, evaluation_targets,
                                                       export, find_cases, load_predictor, predict_steps,
                                                       preprocess, read_model_folder, target_names)
from nnunet_diffusion.evaluation.seeds import seed_spread
from nnunet_diffusion.utils import nanmean

NO_SAMPLER = "-"  # the sampler column of stock (non-diffusion) models
SPREAD = "max_delta_dice"


@dataclass(frozen=True)
class EvaluationOptions:
    """How to predict: folds and checkpoint as for nnUNetv2_predict, plus the sampling grid for diffusion models."""
    folds: tuple[int | str, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    samplers: tuple[str, ...] = ("ddpm", "ddim")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int | None = None  # None: each model's training timesteps T
    early_exit: float | None = None
    per_k: bool = False
    device: str = "cuda"
    use_mirroring: bool = True
    save_probabilities: bool = False

    def __post_init__(self):
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown or not self.samplers:
            raise ValueError(f"samplers must be among {', '.join(SAMPLERS)}, got {', '.join(self.samplers) or 'none'}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")


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
                          "diffusion": diffusion_network(predictor) is not None, "steps": rows[-1]["steps"]})
    summary, spread_rows = summarise(per_case)
    early_summary = summarise_early_exit(early_exit)
    results = {"options": asdict(options), "dataset": models[0].dataset, "images": str(images),
               "reference": str(reference), "cases": [c.name for c in cases], "models": described,
               "summary": summary, "per_case": per_case, "seed_spread": spread_rows, "early_exit": early_summary,
               "per_k": summarise_per_k(per_k + _early_exit_as_per_k(early_exit))}
    write_outputs(results, output)
    return results


def _evaluate_model(predictor: StepPredictor, label: str, cases: Sequence[Case], output: Path,
                    options: EvaluationOptions, names: dict[str, str],
                    prefix: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Per-case rows of one model for every (sampler, seed) run and step, its early-exit rows and per-K rows."""
    network = diffusion_network(predictor)
    targets = evaluation_targets(predictor.label_manager)
    runs = [(NO_SAMPLER, None)] if network is None else [(s, seed) for s in options.samplers for seed in options.seeds]
    steps = 1 if network is None else _steps(network.num_timesteps, options.steps, predictor)
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
                    rows.append(case_row(label, predictor.trainer_name, sampler, seed, k, steps, case.name, metrics,
                                         names))
                if network is not None and options.early_exit is not None:
                    print(f"{where}: {sampler} seed {seed}, early exit at tolerance {options.early_exit}", flush=True)
                    settings = SamplerSettings(sampler, steps, seed, options.early_exit)
                    start = time.perf_counter()
                    exit_logits, steps_used = predict_steps(predictor, data, settings)
                    seconds = time.perf_counter() - start
                    metrics = score(exit_logits[-1], Path(scratch))
                    early.append({"model": label, "sampler": sampler, "seed": seed, "case": case.name,
                                  "tolerance": options.early_exit, "steps": steps,
                                  "mean_steps_used": float(np.mean(steps_used)), "Dice_full": rows[-1]["Dice"],
                                  "Dice_early_exit": nanmean([m["Dice"] for m in metrics.values()]),
                                  "seconds": seconds})
                if options.per_k:
                    if network is None:
                        per_k[-1]["Dice"] = rows[-1]["Dice"]
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


def _steps(num_timesteps: int, requested: int | None, predictor: StepPredictor) -> int:
    if requested is None:
        return num_timesteps
    if not 1 <= requested <= num_timesteps:
        raise ValueError(f"--steps {requested} is outside 1..{num_timesteps}: {predictor.trainer_name} was trained "
                         f"with {num_timesteps} timesteps")
    return requested


def _prediction_folder_with_metadata(predictor: StepPredictor, folder: Path) -> Path:
    """A prediction folder holding dataset.json and plans.json, as nnUNetv2_predict writes (nnUNetv2_ensemble
    reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(predictor.dataset_json, indent=2))
    (folder / "plans.json").write_text(json.dumps(predictor.plans_manager.plans, indent=2))
    return folder


def case_row(label: str, trainer: str, sampler: str, seed: int | None, step: int, steps: int, case: str,
         metrics: dict, names: dict[str, str]) -> dict:
    """One per-case row: foreground means and, per label or region (by name), Dice and HD95."""
    row = {"model": label, "trainer": trainer, "sampler": sampler, "seed": "" if seed is None else seed,
           "step": step, "steps": steps, "case": case,
           "Dice": nanmean([m["Dice"] for m in metrics.values()]),
           "HD95": nanmean([m["HD95"] for m in metrics.values()])}
    for key, values in metrics.items():
        row[f"Dice {names.get(key, key)}"] = values["Dice"]
        row[f"HD95 {names.get(key, key)}"] = values["HD95"]
    return row


def summarise(per_case: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Means over cases and seeds per (model, sampler, step), with the seed spread per step; and per-case spreads."""
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
            f"## Final step\n\n" + markdown_table(final, columns))
    diffusion = [r for r in summary if r["sampler"] != NO_SAMPLER]
    if diffusion:
        for title, column in (("Dice per sampling step", "Dice"), ("Max ΔDice across seeds per step", SPREAD)):
            table = _per_step_table(diffusion, column)
            if table:
                text += f"\n## {title}\n\n" + table
    if results["early_exit"]:
        text += "\n## Early exit\n\n" + markdown_table(results["early_exit"], list(results["early_exit"][0]))
    if results["per_k"]:
        text += ("\n## Dice and predict time per number of steps\n\nSeparate runs per K; seconds per case in "
                 "this process (preprocessing excluded)\n\n" + markdown_table(results["per_k"],
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
    return markdown_table(list(runs.values()), ["model", "sampler", *map(str, range(1, steps + 1))])


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


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with `ablate`: folds, checkpoint, device, test-time augmentation and the sampling grid."""
    parser.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to use; their logits are averaged "
                        "as by nnUNetv2_predict (default: 0)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"], choices=SAMPLERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="noise seeds per sampler (≥ 2 for the seed spread; default: 0 1 2 3 4)")
    parser.add_argument("--steps", type=int, help="sampling steps K (default: each model's training timesteps)")
    parser.add_argument("--early-exit", type=float, metavar="TOL",
                        help="also sample with this early-exit tolerance and report the mean steps used and the "
                             "Dice cost against the full K steps")
    parser.add_argument("--per-k", action="store_true",
                        help="also run every diffusion model separately with K = 1 … T steps and report Dice and "
                             "predict time per case for each (and for early exit and the stock models)")
    parser.add_argument("-device", "--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cpu or mps, as for nnUNetv2_predict")
    parser.add_argument("--disable-tta", "--disable_tta", action="store_true", help="no mirroring at test time")


def options_from_args(args: argparse.Namespace, save_probabilities: bool) -> EvaluationOptions:
    return EvaluationOptions(folds=tuple(f if f == "all" else int(f) for f in args.folds),
                             checkpoint=args.checkpoint, samplers=tuple(args.samplers), seeds=tuple(args.seeds),
                             steps=args.steps, early_exit=args.early_exit, per_k=args.per_k, device=args.device,
                             use_mirroring=not args.disable_tta, save_probabilities=save_probabilities)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--models", nargs="+", required=True,
                        help="trained model folders, <Trainer>__<plans>__<configuration>")
    parser.add_argument("-i", "--images", required=True, help="test images, nnU-Net naming (<case>_0000.nii.gz)")
    parser.add_argument("-r", "--reference", required=True, help="reference segmentations (<case>.nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="folder for tables, plots and predictions")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also keep the final step's probabilities (.npz/.pkl), e.g. for nnUNetv2_ensemble")
    add_prediction_arguments(parser)
    args = parser.parse_args(argv)
    os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()  # so that the in-process predictor finds our trainers
    try:
        options = options_from_args(args, args.save_probabilities)
        evaluate_models(args.models, args.images, args.reference, args.output, options)
    except ValueError as error:
        raise SystemExit(f"nnunet-diffusion evaluate: {error}") from None
    print(f"wrote {Path(args.output) / 'results.md'}, results.csv, results.json, per_case.csv")
    return 0
