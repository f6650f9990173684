"""Report writers: CSV/JSON round trips, Markdown text, PNG plots; plus the seed-spread logic they summarise."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnunet_diffusion.evaluation.report import (TRAINER_COLOURS, figure_colours, model_of, plot_metric_vs_step,
                                               records_table, write_csv, write_json)
from nnunet_diffusion.evaluation.seeds import seed_spread

ROWS = [
    {"trainer": "Recycling", "step": 1, "Dice": 0.81234},
    {"trainer": "DDPM", "step": 1, "Dice": float("nan"), "HD95": 7.5},
]


def test_csv_round_trip(tmp_path: Path):
    path = write_csv(ROWS, tmp_path / "sub" / "results.csv")
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["trainer", "step", "Dice", "HD95"]  # union of keys, first-seen order
    assert back[0]["trainer"] == "Recycling" and int(back[0]["step"]) == 1
    assert float(back[0]["Dice"]) == 0.81234 and back[0]["HD95"] == ""
    assert math.isnan(float(back[1]["Dice"])) and float(back[1]["HD95"]) == 7.5


def test_csv_rejects_no_rows(tmp_path: Path):
    with pytest.raises(ValueError, match="no rows"):
        write_csv([], tmp_path / "empty.csv")


def test_json_converts_numpy_and_keeps_nan(tmp_path: Path):
    obj = {"n": np.int64(3), "dice": np.float32(0.5), "curve": np.array([0.1, np.nan]), "path": tmp_path}
    back = json.loads(write_json(obj, tmp_path / "r.json").read_text())
    assert back["n"] == 3 and back["dice"] == 0.5 and back["path"] == str(tmp_path)
    assert back["curve"][0] == 0.1 and math.isnan(back["curve"][1])


def test_json_rejects_unknown_objects(tmp_path: Path):
    with pytest.raises(TypeError, match="set"):
        write_json({"x": {1, 2}}, tmp_path / "r.json")


def test_records_table_text():
    table = records_table(ROWS + [{"trainer": "a|b"}], ["trainer", "Dice", "HD95"])
    assert table == ("| trainer | Dice | HD95 |\n"
                     "|---|---|---|\n"
                     "| Recycling | 0.8123 |  |\n"
                     "| DDPM | nan | 7.5000 |\n"
                     "| a\\|b |  |  |\n")


def test_plot_metric_vs_step_writes_png(tmp_path: Path):
    out = plot_metric_vs_step({"Recycling": [0.7, 0.8, 0.82], "DDPM": [0.5, 0.6]}, "Dice",
                              tmp_path / "plots" / "dice_vs_step.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="DDPM"):
        plot_metric_vs_step({"Recycling": [0.7], "DDPM": []}, "Dice", tmp_path / "x.png")


def test_seed_spread_on_hand_made_dice():
    # [seed=3, case=2, step=2]
    dice = np.array([
        [[0.80, 0.90], [0.50, np.nan]],
        [[0.70, 0.90], [0.60, np.nan]],
        [[0.75, 0.95], [0.40, np.nan]],
    ])
    spread = seed_spread(dice)
    # case 0: step 1 0.80 − 0.70, step 2 0.95 − 0.90; case 1: step 1 0.60 − 0.40, step 2 NaN for every seed
    np.testing.assert_allclose(spread.per_case_step, [[0.10, 0.05], [0.20, np.nan]])
    np.testing.assert_allclose(spread.per_step, [(0.10 + 0.20) / 2, 0.05])


def test_seed_spread_skips_nan_seeds():
    dice = np.array([[[0.2]], [[np.nan]], [[0.6]]])
    np.testing.assert_allclose(seed_spread(dice).per_case_step, [[0.4]])


@pytest.mark.parametrize("dice, match", [
    (np.zeros((3, 4)), r"\[seed, case, step\]"),
    (np.zeros((1, 4, 5)), "at least 2 seeds"),
    (np.zeros((2, 0, 5)), "no cases"),
    (np.full((2, 3, 4), 80.0), "percentages"),
])
def test_seed_spread_rejects_bad_input(dice: np.ndarray, match: str):
    with pytest.raises(ValueError, match=match):
        seed_spread(dice)


def test_a_trainer_has_one_colour_in_every_figure_and_no_figure_uses_one_for_two_models():
    arms = [f"nnUNetTrainerDiffRecycleFinetune_{e}epochs" for e in (2, 5, 10)]
    labels = ["nnUNetTrainer", "nnUNetTrainerDiffRecycle (ddpm): early exit", *arms, f"{arms[1]} + nnUNetTrainer",
              f"{arms[1]} (ddim)"]
    colours = figure_colours(labels)
    assert colours["nnUNetTrainer"] == "tab:gray"
    assert colours["nnUNetTrainerDiffRecycle (ddpm): early exit"] == TRAINER_COLOURS["nnUNetTrainerDiffRecycle"]
    assert colours[arms[1]] == colours[f"{arms[1]} (ddim)"]
    models = {model_of(label) for label in labels}
    assert len({colours[label] for label in labels}) == len(models)
    assert figure_colours(labels[::-1]) == colours  # the same in every figure that shows the same models
    assert len(set(TRAINER_COLOURS.values())) == len(TRAINER_COLOURS)
