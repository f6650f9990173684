"""`nnunet-diffusion ablate` (the comparison engine on a test folder) and the runner's train/resume/skip decision."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.evaluation import comparison
from nnunet_diffusion.evaluation.commands import ablate
from nnunet_diffusion.training import FINISHED, NEW, RESUMABLE, TrainingError, TrainingRun, check_fold_folder, \
    training_state
from nnunet_diffusion.utils import TrainingBudget
from nnunet_runs import CONFIGURATION, PLANS, nnunet_mean_dice, train_if_missing

DIFFUSION, STOCK = "nnUNetTrainerDiff", "nnUNetTrainer"
TRAINED_BUDGET = ["--epochs", "1", "--iterations", "2", "--val-iterations", "1"]  # what train_if_missing trains


@pytest.mark.parametrize("checkpoints, state", [
    ((), NEW),
    (("checkpoint_latest.pth",), RESUMABLE),
    (("checkpoint_best.pth",), RESUMABLE),
    (("checkpoint_best.pth", "checkpoint_latest.pth"), RESUMABLE),
    (("checkpoint_latest.pth", "checkpoint_final.pth"), FINISHED),
])
def test_the_training_state_follows_the_checkpoints_as_nnunets_c_does(tmp_path, checkpoints, state):
    for name in checkpoints:
        (tmp_path / name).touch()
    assert training_state(tmp_path) == state


def test_a_fold_folder_of_another_budget_is_refused_with_the_fix_named(tmp_path):
    run = TrainingRun("Dataset990_X", "3d_fullres", 0, "A", budget=TrainingBudget(5, 10, 1), results=str(tmp_path))
    run.fold_folder.mkdir(parents=True)
    assert check_fold_folder(run) == NEW
    (run.fold_folder / "checkpoint_latest.pth").touch()
    with pytest.raises(TrainingError, match="of its trainer, not the requested .*remove that fold folder"):
        check_fold_folder(run)  # trained outside the runner: the trainer's own budget
    (run.fold_folder / "training_record.json").write_text(json.dumps({"budget": {"epochs": 5, "iterations": 10,
                                                                                 "val_iterations": 1}}))
    assert check_fold_folder(run) == RESUMABLE
    with pytest.raises(TrainingError, match="holds a training with budget"):
        check_fold_folder(TrainingRun("Dataset990_X", "3d_fullres", 0, "A", budget=TrainingBudget(6, 10, 1),
                                      results=str(tmp_path)))


def test_ablate_scores_finished_models_on_the_test_folder_and_ensembles_with_the_baseline(demo_dataset, tmp_path,
                                                                                         monkeypatch):
    train_if_missing(demo_dataset, DIFFUSION)
    train_if_missing(demo_dataset, STOCK)
    monkeypatch.setattr(comparison, "train_in_fresh_process", lambda *a: pytest.fail("trained a finished fold"))
    output = tmp_path / "ablation"
    assert ablate.main(["-d", str(demo_dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", DIFFUSION,
                        "-i", str(demo_dataset.test_images), "-r", str(demo_dataset.test_labels), "-o", str(output),
                        "--samplers", "ddim", "--seeds", "0", "-device", "cpu", "--disable-tta",
                        *TRAINED_BUDGET]) == 0
    result = json.loads((output / "results.json").read_text())
    assert result["held_out"] == "test folder" and result["missing"] == []
    ensemble = f"{DIFFUSION} + {STOCK}"
    assert [(r["model"], r["sampler"]) for r in result["table"]] == [(STOCK, "-"), (DIFFUSION, "ddim"),
                                                                      (ensemble, "ddim")]
    unit = {t: output / "units" / t / "repeat_0" / "fold_0" for t in (STOCK, DIFFUSION)}
    saved = {DIFFUSION: unit[DIFFUSION] / "predictions" / DIFFUSION / "ddim" / "seed_0",
             STOCK: unit[STOCK] / "predictions" / STOCK, ensemble: unit[DIFFUSION] / "ensemble" / "ddim" / "seed_0"}
    assert [r["Dice"] for r in result["table"]] == pytest.approx(  # nnU-Net's own Dice of the same predictions
        [nnunet_mean_dice(demo_dataset, saved[r["model"]]) for r in result["table"]])
    assert [(d["a"], d["b"]) for d in result["differences"]] == [(DIFFUSION, STOCK), (ensemble, STOCK),
                                                                  (ensemble, DIFFUSION)]
    assert ensemble in (output / "results.md").read_text() and (output / "per_case.csv").is_file()
    for segmentation in sorted(saved[ensemble].glob("*.nii.gz")):  # the argmax of the averaged probabilities
        case = segmentation.name[:-len(".nii.gz")]
        mean = (np.load(saved[DIFFUSION] / f"{case}.npz")["probabilities"]
                + np.load(saved[STOCK] / f"{case}.npz")["probabilities"]) / 2
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation))), mean.argmax(0))


@pytest.mark.parametrize("trainers, baseline, match", [
    ([DIFFUSION, "nnUNetTrainerDoesNotExist"], STOCK, "no trainer class 'nnUNetTrainerDoesNotExist'"),
    ([STOCK], DIFFUSION, f"--baseline {DIFFUSION} is a diffusion trainer"),
])
def test_bad_trainer_names_fail_before_any_training(demo_dataset, tmp_path, monkeypatch, trainers, baseline, match):
    monkeypatch.setattr(comparison, "train_in_fresh_process", lambda *a: pytest.fail("started a training"))
    with pytest.raises(SystemExit, match=match):
        ablate.main(["-d", str(demo_dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", *trainers,
                     "--baseline", baseline, "-i", str(demo_dataset.test_images), "-r", str(demo_dataset.test_labels),
                     "-o", str(tmp_path), "-device", "cpu"])


def test_a_cut_off_checkpoint_is_set_aside_and_the_training_is_never_silently_restarted(tmp_path):
    import torch

    from nnunet_diffusion.training import train
    run = TrainingRun("Dataset990_X", "3d_fullres", 0, "A", results=str(tmp_path))
    run.fold_folder.mkdir(parents=True)
    torch.save({"network_weights": {"w": torch.zeros(1000)}, "current_epoch": 50}, run.fold_folder / "whole.pth")
    whole = (run.fold_folder / "whole.pth").read_bytes()
    (run.fold_folder / "checkpoint_latest.pth").write_bytes(whole[:len(whole) // 2])  # stopped while nnU-Net wrote
    with pytest.raises(TrainingError, match="no readable checkpoint to resume from"):
        train(run)
    assert (run.fold_folder / "checkpoint_latest.pth.incomplete").is_file()
    assert not (run.fold_folder / "checkpoint_latest.pth").exists()
