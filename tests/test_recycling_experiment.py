"""The BraTS cross-validation experiment's bookkeeping: arms, paired differences, bootstrap interval, tables
(on made-up unit results; the experiment itself runs for hours, see docs/recycling_brats.md)."""
import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "recycling_brats.py"
spec = importlib.util.spec_from_file_location("recycling_brats", SCRIPT)
experiment = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = experiment  # dataclasses look their module up while the script is executed
spec.loader.exec_module(experiment)

CASES = ["a", "b", "c", "d"]


def unit(trainer: str, repeat: int, fold: int, final: float) -> dict:
    diffusion = trainer.startswith("nnUNetTrainerDiff")
    dice = {f"{s}/{k}": final - 0.01 * (5 - k) for s in ("ddim", "ddpm") for k in range(1, 6)} if diffusion \
        else {"-/1": final}
    return {"arm": f"{trainer}#{repeat}", "trainer": trainer, "repeat": repeat, "fold": fold, "case": CASES[fold],
            "dice": dice, "epoch_seconds": [10.0 + diffusion, 12.0], "pseudo_dice": [0.5, 0.7],
            "train_loss": [0.1, 0.0], "predict_seconds_per_run": 1.0 + 4 * diffusion}


def test_arms_parse_with_their_repeat():
    arm = experiment.parse_arm("nnUNetTrainerDiffRecycle#1")
    assert (arm.trainer, arm.repeat, arm.diffusion, arm.label) == ("nnUNetTrainerDiffRecycle", 1, True,
                                                                   "nnUNetTrainerDiffRecycle#1")
    assert experiment.parse_arm("nnUNetTrainer").repeat == 0 and not experiment.parse_arm("nnUNetTrainer").diffusion


def test_bootstrap_interval_brackets_the_mean_and_shrinks_to_a_point_for_equal_differences():
    low, high = experiment.bootstrap_interval(np.array([0.1, 0.2, 0.3, 0.4]))
    assert low < 0.25 < high
    assert experiment.bootstrap_interval(np.array([0.05] * 4)) == pytest.approx((0.05, 0.05))


def test_summary_pairs_cases_averaged_over_repeats_and_writes_every_table():
    units = [unit("nnUNetTrainer", 0, f, 0.8) for f in range(4)]
    units += [unit("nnUNetTrainerDiff", r, f, 0.6 + 0.02 * r) for r in (0, 1) for f in range(4)]
    units += [unit("nnUNetTrainerDiffRecycle", r, f, 0.7 + 0.01 * f) for r in (0, 1) for f in range(4)]
    ensembles = [{"trainer": "nnUNetTrainerDiffRecycle", "case": CASES[f], "dice": {"ddim": 0.85, "ddpm": 0.84}}
                 for f in range(4)]
    summary = experiment.summarise(units, ensembles, 5)
    differences = {(d["a"], d["b"], d["sampler"]): d for d in summary["differences"]}
    recycle_vs_diff = differences["nnUNetTrainerDiffRecycle", "nnUNetTrainerDiff", "ddim"]
    assert recycle_vs_diff["per_case"] == pytest.approx({c: 0.1 + 0.01 * f - 0.01 for f, c in enumerate(CASES)})
    assert recycle_vs_diff["mean_difference"] == pytest.approx(0.105)
    low, high = recycle_vs_diff["interval_95"]
    assert low <= 0.105 <= high
    ensemble = differences[f"nnUNetTrainerDiffRecycle + {experiment.STOCK}", experiment.STOCK, "ddpm"]
    assert ensemble["mean_difference"] == pytest.approx(0.04)
    row = next(r for r in summary["table"] if r["trainer"] == "nnUNetTrainerDiff" and r["sampler"] == "ddim"
               and r["step"] == 5)
    assert row["runs"] == 8 and row["dice_mean"] == pytest.approx(0.61)
    args = argparse.Namespace(epochs=2, iterations=3, val_iterations=1)
    text = experiment.markdown(summary, args, 5)
    assert "| nnUNetTrainerDiff | ddim | 8 | 0.610 ± 0.011 | 0.570, 0.580, 0.590, 0.600, 0.610 |" in text
    assert "nnUNetTrainerDiffRecycle − nnUNetTrainerDiff | ddim | +0.105" in text
    assert "| nnUNetTrainer | 11.0 | 11.0 | 1.00 | 1.0 | 1.0 | 1.00 |" in text
    assert "| nnUNetTrainerDiff | 11.5 | 11.5 | 1.05 | 5.0 | 5.0 | 5.00 |" in text
