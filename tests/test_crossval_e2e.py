"""`nnunet-diffusion crossval` end to end on a generated dataset: 2 folds, the stock and the recycling trainer,
one repeat: nnU-Net's split, training in fresh processes, held-out prediction per step, ensembles, nnU-Net's
postprocessing, statistics, and a rerun that trains and predicts nothing; a fold trained by hand with
nnUNetv2_train, read from nnU-Net's own validation."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nnunet_diffusion.cli import main as cli_main
from nnunet_runs import make_dataset, run

ARGUMENTS = ["-c", "3d_cpu", "-p", "nnUNetPlansCPU", "-tr", "nnUNetTrainerDiffRecycle", "-f", "0", "1",
             "--num-folds", "2", "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--samplers", "ddim",
             "--steps", "2", "--disable-tta", "--postprocessing"]
PP = " (postprocessed)"


@pytest.fixture(scope="module")
def crossval_dataset(nnunet_workspace):
    return make_dataset(993, "CrossVal", num_train=6, num_test=1)


def nnunet_held_out_dice(output: Path, model: str) -> float:
    """A model's Dice from the summary.json files nnU-Net's postprocessing wrote for its held-out predictions of
    every fold (before or after postprocessing), averaged as the table averages: over labels per case, then over
    the cases of all folds."""
    folder = model.removesuffix(PP).replace(" + ", "+")
    summaries = [f for f in output.glob(f"units/*/repeat_0/fold_*/postprocessing/{folder}/**/summary.json")
                 if (f.parent.name == "postprocessed") == model.endswith(PP)]
    cases = [case for f in summaries for case in json.loads(f.read_text())["metric_per_case"]]
    assert len(cases) == 6
    return float(np.nanmean([np.nanmean([m["Dice"] for m in case["metrics"].values()]) for case in cases]))


def test_crossval_trains_scores_ensembles_and_compares_then_resumes(crossval_dataset, tmp_path, capsys):
    output = tmp_path / "cv"
    assert cli_main(["crossval", "-d", str(crossval_dataset.dataset_id), *ARGUMENTS, "-o", str(output)]) == 0
    result = json.loads((output / "results.json").read_text())
    splits = result["splits"]
    assert len(splits) == 2 and sorted(c for s in splits for c in s["val"]) == sorted(
        f"crossval_tr_{i:03d}" for i in range(6))
    assert [(u["trainer"], u["fold"]) for u in result["units"]] == [
        ("nnUNetTrainer", 0), ("nnUNetTrainerDiffRecycle", 0), ("nnUNetTrainer", 1), ("nnUNetTrainerDiffRecycle", 1)]
    assert all(u["training"]["budget"] == {"epochs": 1, "iterations": 2, "val_iterations": 1} for u in result["units"])
    assert all(len(u["pseudo_dice"]) == 1 for u in result["units"])
    rows = {r["model"]: r for r in result["table"]}
    models = ["nnUNetTrainer", "nnUNetTrainerDiffRecycle", "nnUNetTrainerDiffRecycle + nnUNetTrainer"]
    assert [r["model"] for r in result["table"]] == [*models, *(m + PP for m in models)]
    for model, row in rows.items():  # nnU-Net's own Dice of the same held-out predictions
        assert (row["cases"], row["Dice"]) == (6, pytest.approx(nnunet_held_out_dice(output, model)))
    for fold in (0, 1):  # what nnU-Net chose, per prediction folder of the unit (the ensemble's too)
        chosen = json.loads((output / "units" / "nnUNetTrainerDiffRecycle" / "repeat_0" / f"fold_{fold}" /
                             "postprocessed.json").read_text())["chosen"]
        assert sorted(chosen) == ["nnUNetTrainerDiffRecycle + nnUNetTrainer ddim/seed_0",
                                  "nnUNetTrainerDiffRecycle ddim/seed_0"]
    assert [r["step"] for r in result["per_step"]] == [1, 2]
    pairs = [(d["a"], d["b"], d["cases"]) for d in result["differences"]]
    paper_pairs = [("nnUNetTrainerDiffRecycle", "nnUNetTrainer"),
                   ("nnUNetTrainerDiffRecycle + nnUNetTrainer", "nnUNetTrainer"),
                   ("nnUNetTrainerDiffRecycle + nnUNetTrainer", "nnUNetTrainerDiffRecycle")]
    assert pairs == [(a, b, 6) for a, b in paper_pairs] + [(a + PP, b + PP, 6) for a, b in paper_pairs]
    assert all(0 <= d["p_signed_rank"] <= 1 and d["interval_low"] <= d["mean"] <= d["interval_high"]
               and d["folds"] == 2 and 0 <= d["folds_a_better"] <= 2 and [f["fold"] for f in d["per_fold"]] == [0, 1]
               for d in result["differences"])
    markdown = (output / "results.md").read_text()
    assert "Wilcoxon" in markdown and "nnUNetTrainerDiffRecycle + nnUNetTrainer" in markdown
    assert "## Fold by fold" in markdown and "| fold 0 | fold 1 |" in markdown
    for png in ("pseudo_dice.png", "dice_vs_step_ddim.png", "loss_per_timestep.png"):
        assert (output / png).stat().st_size > 0
    capsys.readouterr()

    assert cli_main(["crossval", "-d", str(crossval_dataset.dataset_id), *ARGUMENTS, "-o", str(output)]) == 0
    rerun = capsys.readouterr().out
    assert "train " not in rerun and "predict " not in rerun  # every step came from its file
    assert json.loads((output / "results.json").read_text())["table"] == result["table"]

    # resumed elsewhere from the kept output alone (scores, no trainings, no predictions): the finished folds
    # stand; fold 1 without its ensemble is trained again, as a whole
    shutil.rmtree(output / "results")
    for predictions in list(output.glob("units/*/*/*/predictions")):
        shutil.rmtree(predictions)
    (output / "units" / "nnUNetTrainerDiffRecycle" / "repeat_0" / "fold_1" / "ensemble" / "ensemble.json").unlink()
    assert cli_main(["crossval", "-d", str(crossval_dataset.dataset_id), *ARGUMENTS, "-o", str(output)]) == 0
    resumed = capsys.readouterr().out
    assert "train nnUNetTrainer repeat 0 fold 0" not in resumed and "predict nnUNetTrainerDiffRecycle repeat 0 fold 0" \
        not in resumed
    assert "train nnUNetTrainer repeat 0 fold 1" in resumed
    assert "train nnUNetTrainerDiffRecycle repeat 0 fold 1" in resumed
    units = json.loads((output / "results.json").read_text())["units"]
    assert [u["training"] for u in units[:2]] == [u["training"] for u in result["units"][:2]]
    assert all((output / "results" / "Dataset993_CrossVal" / f"{t}__nnUNetPlansCPU__3d_cpu" / "fold_1" /
                "checkpoint_final.pth").is_file() for t in ("nnUNetTrainer", "nnUNetTrainerDiffRecycle"))


def test_crossval_refuses_a_fold_trained_with_another_budget(crossval_dataset, tmp_path):
    output = tmp_path / "cv"
    arguments = ["crossval", "-d", str(crossval_dataset.dataset_id), "-c", "3d_cpu", "-p", "nnUNetPlansCPU", "-tr",
                 "nnUNetTrainer", "-f", "0", "--iterations", "2", "--val-iterations", "1", "--disable-tta", "-o",
                 str(output)]
    assert cli_main([*arguments, "--epochs", "1"]) == 0
    with pytest.raises(SystemExit, match="nnunet-diffusion crossval: .* holds a training with budget"):
        cli_main([*arguments, "--epochs", "2"])
    with pytest.raises(SystemExit, match="finds no trainer class 'nnUNetTrainerNope'"):
        cli_main(["crossval", "-d", str(crossval_dataset.dataset_id), "-c", "3d_cpu", "-tr", "nnUNetTrainerNope",
                  "-o", str(output)])


def test_a_fold_trained_by_hand_with_nnunetv2_train_is_read_from_nnunets_own_validation(crossval_dataset, tmp_path,
                                                                                          capsys):
    trainer = "nnUNetTrainer_1epoch"
    run(["nnUNetv2_train", str(crossval_dataset.dataset_id), "3d_cpu", "0", "-p", "nnUNetPlansCPU", "-tr", trainer,
         "-device", "cpu", "--npz"])
    output = tmp_path / "cv"
    assert cli_main(["crossval", "-d", str(crossval_dataset.dataset_id), "-c", "3d_cpu", "-p", "nnUNetPlansCPU",
                     "-tr", trainer, "--baseline", trainer, "-f", "0", "--results-root", os.environ["nnUNet_results"],
                     "-o", str(output)]) == 0
    assert "train " not in capsys.readouterr().out
    (unit,) = json.loads((output / "results.json").read_text())["units"]
    assert unit["source"] == "nnU-Net's fold validation" and unit["training"]["budget"] is None
    validation = json.loads((Path(unit["predictions"]["-"]) / "summary.json").read_text())
    per_case = [r for r in json.loads((output / "units" / trainer / "repeat_0" / "fold_0" / "unit.json").read_text()
                                      )["per_case"]]
    assert len(per_case) == len(validation["metric_per_case"])
    assert np.mean([r["Dice"] for r in per_case]) == pytest.approx(validation["foreground_mean"]["Dice"])
