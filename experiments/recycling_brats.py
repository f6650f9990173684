"""Recycling vs plain diffusion vs stock nnU-Net on real MR: BraTS 2013 whole tumour, 4-fold cross-validation.

One resumable command (every finished step is skipped on a rerun):

    python experiments/recycling_brats.py --workdir /tmp/recycling_brats

1. the 4 shared BraTS 2013 cases → nnU-Net raw (`convert-brats --whole-tumour --spacing 2`), planned and
   preprocessed for nnU-Net's `2d` configuration, `cpu_2d` preset (80×80 patches, batch 12, 8–64 features);
   `splits_final.json` holds 4 folds, each case tested once;
2. every arm (trainer × repeat) is trained on every fold with the same budget (epochs × iterations, batch 12)
   through nnU-Net's own loop, one training at a time, in a fresh process (nnU-Net's default augmentation
   processes); repeats use separate `nnUNet_results` folders and seeds;
3. every model predicts its fold's held-out case with nnU-Net's predictor (no mirroring, as in the paper);
   diffusion models with DDIM and DDPM, 5 steps, every step scored; each diffusion model is also ensembled with
   the stock model of its fold (nnU-Net's probability averaging);
4. `results.json` (everything, per case) and `results.md` (the tables) are written to the workdir.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_diffusion.plans import plan_and_preprocess_with_preset
from nnunet_diffusion.utils import markdown_table, model_folder

DATASET_ID = 501
DATASET = "Dataset501_BraTS2013WT"
PLANS = "nnUNetPlansCPU"
CONFIGURATION = "2d_cpu"
PRESET = "cpu_2d"
FOLDS = (0, 1, 2, 3)
STOCK = "nnUNetTrainer"


@dataclass(frozen=True)
class Arm:
    """One trained model per fold: a trainer and a repeat index (its own results folder and seed)."""
    trainer: str
    repeat: int = 0

    @property
    def label(self) -> str:
        return f"{self.trainer}#{self.repeat}"

    @property
    def diffusion(self) -> bool:
        return self.trainer.startswith("nnUNetTrainerDiff")


# in the order they run: the comparisons the claim needs first, then the levers
DEFAULT_ARMS = ("nnUNetTrainer#0", "nnUNetTrainerDiff#0", "nnUNetTrainerDiffRecycle#0",
                "nnUNetTrainerNoDeepSupervision#0", "nnUNetTrainerDiff#1", "nnUNetTrainerDiffRecycle#1",
                "nnUNetTrainerDiffRecycleDS#0", "nnUNetTrainerDiffRecycleAllT#0",
                "nnUNetTrainerDiffRecycleImportance#0", "nnUNetTrainerDiffDS#0", "nnUNetTrainer#1")


def parse_arm(text: str) -> Arm:
    trainer, _, repeat = text.partition("#")
    return Arm(trainer, int(repeat or 0))


def nnunet_env(workdir: Path, repeat: int = 0) -> dict[str, str]:
    from nnunet_diffusion.environment import with_plugin_environment
    env = with_plugin_environment()
    env.update(nnUNet_raw=str(workdir / "raw"), nnUNet_preprocessed=str(workdir / "preprocessed"),
               nnUNet_results=str(workdir / "results" / f"repeat_{repeat}"), nnUNet_def_n_proc="2")
    return env


def run(command: list[str], env: dict[str, str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}); see {log}")


def prepare(workdir: Path, source: Path) -> list[str]:
    """Raw dataset, 2d preprocessing, the cpu_2d plans and the 4-fold split; returns the case ids."""
    env = nnunet_env(workdir)
    raw = workdir / "raw" / DATASET
    preprocessed = workdir / "preprocessed" / DATASET
    log = workdir / "logs" / "prepare.log"
    if not (raw / "dataset.json").is_file():
        run(["nnunet-diffusion", "convert-brats", str(source), "--raw-root", str(workdir / "raw"), "--dataset-id",
             str(DATASET_ID), "--spacing", "2", "--whole-tumour"], env, log)
    if not (preprocessed / f"{PLANS}.json").is_file():
        plan_and_preprocess_with_preset(DATASET_ID, PRESET, preprocessed.parent, lambda command: run(command, env, log))
    cases = sorted(f.name[:-len(".nii.gz")] for f in (raw / "labelsTr").glob("*.nii.gz"))
    splits = [{"train": [c for c in cases if c != held_out], "val": [held_out]} for held_out in cases]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1))
    for fold, case in enumerate(cases):
        test = workdir / "test" / f"fold_{fold}"
        for kind in ("images", "labels"):
            (test / kind).mkdir(parents=True, exist_ok=True)
        for image in raw.glob(f"imagesTr/{case}_*.nii.gz"):
            _link(image, test / "images" / image.name)
        _link(raw / "labelsTr" / f"{case}.nii.gz", test / "labels" / f"{case}.nii.gz")
    return cases


def _link(source: Path, target: Path) -> None:
    if not target.exists():
        target.symlink_to(source.resolve())


def fold_folder(workdir: Path, arm: Arm, fold: int) -> Path:
    return model_folder(workdir / "results" / f"repeat_{arm.repeat}", DATASET, arm.trainer, PLANS,
                        CONFIGURATION) / f"fold_{fold}"


def train(workdir: Path, arm: Arm, fold: int, args: argparse.Namespace) -> None:
    """Train one model in a fresh process unless its checkpoint_final exists (an unfinished one restarts)."""
    if (fold_folder(workdir, arm, fold) / "checkpoint_final.pth").is_file():
        return
    print(f"train {arm.label} fold {fold}", flush=True)
    command = [sys.executable, __file__, "train-one", "--trainer", arm.trainer, "--fold", str(fold),
               "--seed", str(1000 * arm.repeat + fold), "--epochs", str(args.epochs), "--iterations",
               str(args.iterations), "--val-iterations", str(args.val_iterations)]
    run(command, nnunet_env(workdir, arm.repeat), workdir / "logs" / f"{arm.label}_fold{fold}.log")


def train_one(args: argparse.Namespace) -> None:
    from nnunet_diffusion.runs import TrainingBudget, train_model
    train_model(str(DATASET_ID), CONFIGURATION, args.fold, args.trainer, PLANS,
                TrainingBudget(args.epochs, args.iterations, args.val_iterations), seed=args.seed)


def evaluate(workdir: Path, arm: Arm, fold: int) -> dict:
    """Per-step Dice of one model on its fold's held-out case (cached in evaluation/<arm>/fold_<f>/unit.json)."""
    output = workdir / "evaluation" / arm.label.replace("#", "_") / f"fold_{fold}"
    unit = output / "unit.json"
    if unit.is_file():
        return json.loads(unit.read_text())
    from nnunet_diffusion.evaluation.model_evaluation import EvaluationOptions, evaluate_models
    from nnunet_diffusion.runs import epoch_seconds, training_log
    from nnunet_diffusion.utils import environment
    options = EvaluationOptions(folds=(fold,), samplers=("ddim", "ddpm"), seeds=(0,), device="cpu",
                                use_mirroring=False, save_probabilities=True)
    with environment(**nnunet_env(workdir, arm.repeat)):
        start = time.perf_counter()
        results = evaluate_models([fold_folder(workdir, arm, fold).parent], workdir / "test" / f"fold_{fold}" / "images",
                                  workdir / "test" / f"fold_{fold}" / "labels", output, options)
        seconds = time.perf_counter() - start
    logging = training_log(fold_folder(workdir, arm, fold) / "checkpoint_final.pth")
    runs = 1 if not arm.diffusion else 2
    record = {"arm": arm.label, "trainer": arm.trainer, "repeat": arm.repeat, "fold": fold,
              "case": results["cases"][0],
              "dice": {f"{r['sampler']}/{r['step']}": r["Dice"] for r in results["per_case"]},
              "epoch_seconds": epoch_seconds(logging), "pseudo_dice": [float(x) for x in logging["mean_fg_dice"]],
              "train_loss": [float(x) for x in logging["train_losses"]],
              "predict_seconds_per_run": seconds / runs, "output": str(output)}
    unit.write_text(json.dumps(record, indent=1))
    return record


def ensemble(workdir: Path, arm: Arm, fold: int, stock: dict) -> dict:
    """Final-step probabilities of a diffusion model averaged with its fold's stock model, per sampler."""
    output = workdir / "evaluation" / "ensembles" / arm.label.replace("#", "_") / f"fold_{fold}"
    cached = output / "ensemble.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from nnunet_diffusion.evaluation.ablation import ensemble_folders
    from nnunet_diffusion.evaluation.metrics import evaluate_folder
    stock_folder = Path(stock["output"]) / "predictions" / STOCK
    file_ending = json.loads((stock_folder / "dataset.json").read_text())["file_ending"]
    unit = evaluate(workdir, arm, fold)
    dice = {}
    for sampler in ("ddim", "ddpm"):
        diffusion_folder = Path(unit["output"]) / "predictions" / arm.trainer / sampler / "seed_0"
        folder = ensemble_folders(diffusion_folder, stock_folder, [stock["case"]], output / sampler)
        scores = evaluate_folder(folder, workdir / "test" / f"fold_{fold}" / "labels", [1], file_ending)
        dice[sampler] = scores["foreground_mean"]["Dice"]
    cached.write_text(json.dumps(dice))
    return dice


def bootstrap_interval(values: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of paired differences, resampling cases."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(units: list[dict], ensembles: list[dict], steps: int) -> dict:
    """Per arm-trainer: mean ± sd over folds and repeats, per sampler and step; paired per-case differences."""
    trainers = list(dict.fromkeys(u["trainer"] for u in units))
    table, curves, timing = [], [], []
    for trainer in trainers:
        mine = [u for u in units if u["trainer"] == trainer]
        keys = ["-/1"] if "-/1" in mine[0]["dice"] else [f"{s}/{k}" for s in ("ddim", "ddpm") for k in
                                                         range(1, steps + 1)]
        for key in keys:
            values = np.array([u["dice"][key] for u in mine])
            sampler, step = key.split("/")
            table.append({"trainer": trainer, "sampler": sampler, "step": int(step), "runs": len(values),
                          "dice_mean": float(values.mean()), "dice_sd": float(values.std(ddof=1)) if len(values) > 1
                          else None, "per_case": {u["case"]: None for u in mine}})
            per_case = {}
            for u in mine:
                per_case.setdefault(u["case"], []).append(u["dice"][key])
            table[-1]["per_case"] = {c: float(np.mean(v)) for c, v in per_case.items()}
        curve = np.array([u["pseudo_dice"] for u in mine])
        curves.append({"trainer": trainer, "pseudo_dice_mean": curve.mean(0).tolist()})
        timing.append({"trainer": trainer,
                       "epoch_seconds": float(np.median([e for u in mine for e in u["epoch_seconds"]])),
                       "epoch_seconds_fastest_run": float(min(np.median(u["epoch_seconds"]) for u in mine)),
                       "predict_seconds_per_case": float(np.median([u["predict_seconds_per_run"] for u in mine])),
                       "predict_seconds_fastest_run": float(min(u["predict_seconds_per_run"] for u in mine))})
    ensemble_rows = []
    for trainer in dict.fromkeys(e["trainer"] for e in ensembles):
        for sampler in ("ddim", "ddpm"):
            mine = [e for e in ensembles if e["trainer"] == trainer]
            values = np.array([e["dice"][sampler] for e in mine])
            per_case = {}
            for e in mine:
                per_case.setdefault(e["case"], []).append(e["dice"][sampler])
            ensemble_rows.append({"trainer": f"{trainer} + {STOCK}", "sampler": sampler, "step": steps,
                                  "runs": len(values), "dice_mean": float(values.mean()),
                                  "dice_sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                                  "per_case": {c: float(np.mean(v)) for c, v in per_case.items()}})
    return {"table": table, "ensembles": ensemble_rows, "curves": curves, "timing": timing,
            "differences": paired_differences(table + ensemble_rows, steps)}


def final_row(rows: list[dict], trainer: str, sampler: str, steps: int) -> dict | None:
    for row in rows:
        if row["trainer"] == trainer and row["sampler"] in (sampler, "-") and row["step"] in (steps, 1) and \
                (row["sampler"] == "-" or row["step"] == steps):
            return row
    return None


def paired_differences(rows: list[dict], steps: int) -> list[dict]:
    """A − B per held-out case (each case's Dice averaged over repeats), mean and bootstrap interval."""
    pairs = [("nnUNetTrainerDiffRecycle", "nnUNetTrainerDiff"), ("nnUNetTrainerDiffRecycle", STOCK),
             ("nnUNetTrainerDiff", STOCK), ("nnUNetTrainerDiffRecycleDS", "nnUNetTrainerDiffRecycle"),
             ("nnUNetTrainerDiffRecycleAllT", "nnUNetTrainerDiffRecycle"),
             ("nnUNetTrainerDiffRecycleImportance", "nnUNetTrainerDiffRecycle"),
             ("nnUNetTrainerDiffDS", "nnUNetTrainerDiff"), ("nnUNetTrainerDiffRecycleAllT", "nnUNetTrainerDiff"),
             ("nnUNetTrainerDiffRecycleAllT", STOCK), (f"nnUNetTrainerDiffRecycle + {STOCK}", STOCK),
             (f"nnUNetTrainerDiff + {STOCK}", STOCK), (f"nnUNetTrainerDiffRecycleAllT + {STOCK}", STOCK),
             ("nnUNetTrainerNoDeepSupervision", STOCK)]
    out = []
    for a, b in pairs:
        for sampler in ("ddim", "ddpm"):
            row_a, row_b = final_row(rows, a, sampler, steps), final_row(rows, b, sampler, steps)
            if row_a is None or row_b is None:
                continue
            cases = sorted(set(row_a["per_case"]) & set(row_b["per_case"]))
            diffs = np.array([row_a["per_case"][c] - row_b["per_case"][c] for c in cases])
            low, high = bootstrap_interval(diffs)
            one_pass = row_a["sampler"] == "-" and row_b["sampler"] == "-"
            out.append({"a": a, "b": b, "sampler": "-" if one_pass else sampler, "cases": len(cases),
                        "mean_difference": float(diffs.mean()),
                        "interval_95": [low, high], "per_case": dict(zip(cases, diffs.tolist()))})
            if one_pass:
                break
    return out


def markdown(summary: dict, args: argparse.Namespace, steps: int) -> str:
    def fmt(row):
        sd = f" ± {row['dice_sd']:.3f}" if row["dice_sd"] is not None else ""
        return f"{row['dice_mean']:.3f}{sd}"

    lines = [f"# Recycling on BraTS 2013 whole tumour: 4-fold cross-validation ({CONFIGURATION}, {PLANS})", "",
             f"Budget per model: {args.epochs} epochs × {args.iterations} iterations (batch 12), "
             f"{args.val_iterations} validation batches per epoch. Dice of the held-out case, mean ± sd over "
             "folds and repeats; diffusion models at the last of 5 steps (no mirroring).", ""]
    table, rows = summary["table"], []
    for trainer in dict.fromkeys(r["trainer"] for r in table):
        for sampler in ("-", "ddim", "ddpm"):
            runs = [r for r in table if r["trainer"] == trainer and r["sampler"] == sampler]
            if runs:
                per_step = ", ".join(f"{r['dice_mean']:.3f}" for r in runs) if sampler != "-" else ""
                rows.append([trainer, sampler, runs[-1]["runs"], fmt(runs[-1]), per_step])
    rows += [[row["trainer"], row["sampler"], row["runs"], fmt(row), ""] for row in summary["ensembles"]]
    lines += [markdown_table(["model", "sampler", "runs", "Dice", "per step 1 … 5"], rows), ""]
    lines += ["Paired per-case differences (final step; each case's Dice averaged over repeats), mean and 95 % "
              "bootstrap interval over the 4 held-out cases:", "",
              markdown_table(["A − B", "sampler", "mean", "95 % interval", "per case"],
                             [[f"{d['a']} − {d['b']}", d["sampler"], f"{d['mean_difference']:+.3f}",
                               f"[{d['interval_95'][0]:+.3f}, {d['interval_95'][1]:+.3f}]",
                               ", ".join(f"{v:+.3f}" for v in d["per_case"].values())]
                              for d in summary["differences"]]), ""]
    lines += ["Validation pseudo-Dice per epoch (nnU-Net's online estimate on the held-out case), mean over "
              "folds and repeats:", "",
              markdown_table(["model", *(e + 1 for e in range(args.epochs))],
                             [[c["trainer"], *(f"{v:.3f}" for v in c["pseudo_dice_mean"])] for c in summary["curves"]]),
              ""]
    stock = next((t for t in summary["timing"] if t["trainer"] == STOCK), None)
    lines += ["Wall clock (2 CPU cores, nnU-Net's default augmentation processes): median epoch time (training "
              "and validation) over all runs, and of the fastest run, the one least disturbed by other work on the "
              "machine; the same for the evaluation time per case and sampler run (one held-out case, no "
              "mirroring, in-process: prediction, then export and scoring of every step, 5 for diffusion models, 1 "
              "for stock); ratios of the fastest runs:", ""]
    timing_rows = []
    for t in summary["timing"]:
        epoch_ratio = t["epoch_seconds_fastest_run"] / stock["epoch_seconds_fastest_run"] if stock else float("nan")
        predict_ratio = t["predict_seconds_fastest_run"] / stock["predict_seconds_fastest_run"] if stock \
            else float("nan")
        timing_rows.append([t["trainer"], f"{t['epoch_seconds']:.1f}", f"{t['epoch_seconds_fastest_run']:.1f}",
                            f"{epoch_ratio:.2f}", f"{t['predict_seconds_per_case']:.1f}",
                            f"{t['predict_seconds_fastest_run']:.1f}", f"{predict_ratio:.2f}"])
    lines.append(markdown_table(["model", "epoch (s)", "fastest (s)", "× stock", "evaluation per case (s)",
                                 "fastest (s)", "× stock"], timing_rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", default="all", choices=("all", "train-one"))
    parser.add_argument("--workdir", type=Path, default=Path("recycling_brats"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" /
                        "brats2013_deepmedic")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help="TRAINER#REPEAT, in running order")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--val-iterations", type=int, default=10)
    parser.add_argument("--trainer")
    parser.add_argument("--fold", type=int)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    if args.step == "train-one":
        train_one(args)
        return 0
    workdir = args.workdir.resolve()
    prepare(workdir, args.data)
    arms = [parse_arm(a) for a in args.arms]
    if arms[0].trainer != STOCK:
        raise SystemExit(f"the first arm must be {STOCK}#0: the ensembles and ratios refer to it")
    units, ensembles = [], []
    for arm in arms:
        for fold in FOLDS:
            train(workdir, arm, fold, args)
            units.append(evaluate(workdir, arm, fold))
            if arm.diffusion:
                stock = next(u for u in units if u["arm"] == arms[0].label and u["fold"] == fold)
                ensembles.append({"trainer": arm.trainer, "case": stock["case"],
                                  "dice": ensemble(workdir, arm, fold, stock)})
            summary = summarise(units, ensembles, 5)
            (workdir / "results.json").write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()},
                                                              "units": units, "ensembles": ensembles,
                                                              **summary}, indent=1))
            (workdir / "results.md").write_text(markdown(summary, args, 5))
    print(f"wrote {workdir / 'results.md'} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
