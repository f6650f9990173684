"""`nnunet-diffusion ablate`: the train/resume/skip decision, and a run over finished models with an ensemble row."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.evaluation import ablate, ablation
from nnunet_diffusion.evaluation.ablation import RESUME, SKIP, TRAIN, plan_training, training_action
from nnunet_runs import CONFIGURATION, PLANS, train_if_missing

DIFFUSION, STOCK = "nnUNetTrainerDiff", "nnUNetTrainer"



@pytest.mark.parametrize("checkpoints, action", [
    ((), TRAIN),
    (("checkpoint_latest.pth",), RESUME),
    (("checkpoint_best.pth",), RESUME),
    (("checkpoint_best.pth", "checkpoint_latest.pth"), RESUME),
    (("checkpoint_latest.pth", "checkpoint_final.pth"), SKIP),
])
def test_training_action_follows_the_checkpoints_in_the_fold_folder(tmp_path, checkpoints, action):
    for name in checkpoints:
        (tmp_path / name).touch()
    assert training_action(tmp_path) == action


def test_plan_training_resumes_with_c_and_skips_finished_folds(tmp_path):
    dataset, folder = "Dataset990_X", "__nnUNetPlans__3d_fullres"
    (tmp_path / dataset / f"A{folder}" / "fold_0").mkdir(parents=True)
    (tmp_path / dataset / f"A{folder}" / "fold_0" / "checkpoint_latest.pth").touch()
    (tmp_path / dataset / f"A{folder}" / "fold_1").mkdir()
    (tmp_path / dataset / f"A{folder}" / "fold_1" / "checkpoint_final.pth").touch()
    jobs = plan_training(tmp_path, dataset, "3d_fullres", "nnUNetPlans", [0, 1], ["A", "B"], "cuda")
    assert [(j.trainer, j.fold, j.action) for j in jobs] == [("A", 0, RESUME), ("A", 1, SKIP), ("B", 0, TRAIN),
                                                              ("B", 1, TRAIN)]
    assert jobs[0].command == ("nnUNetv2_train", dataset, "3d_fullres", "0", "-tr", "A", "-p", "nnUNetPlans",
                               "-device", "cuda", "--c")
    assert "--c" not in jobs[2].command
    assert jobs[2].fold_folder == tmp_path / dataset / f"B{folder}" / "fold_0"


def test_ablate_skips_finished_models_and_adds_the_ensemble_with_the_baseline(demo_dataset, tmp_path, monkeypatch):
    train_if_missing(demo_dataset, DIFFUSION)
    train_if_missing(demo_dataset, STOCK)
    started = []
    monkeypatch.setattr(ablation, "run_training", lambda job, env: started.append(job))
    output = tmp_path / "ablation"
    assert ablate.main(["-d", str(demo_dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", DIFFUSION,
                        "-i", str(demo_dataset.test_images), "-r", str(demo_dataset.test_labels), "-o", str(output),
                        "--samplers", "ddim", "--seeds", "0", "-device", "cpu", "--disable-tta"]) == 0
    assert started == []
    result = json.loads((output / "ablation.json").read_text())
    assert [(t["trainer"], t["action"]) for t in result["training"]] == [(DIFFUSION, SKIP), (STOCK, SKIP)]
    ensemble = f"{DIFFUSION} + {STOCK}"
    assert [(r["model"], r["sampler"]) for r in result["table"]] == [(DIFFUSION, "ddim"), (STOCK, "-"),
                                                                      (ensemble, "ddim")]
    assert all(0 <= r["Dice"] <= 1 for r in result["table"])
    assert ensemble in (output / "ablation.md").read_text()
    assert (output / "ablation.csv").is_file() and (output / "dice_vs_step_ddim.png").is_file()

    # the ensemble is the argmax of the two models' averaged final-step probabilities
    predictions = output / "predictions"
    for segmentation in sorted((output / "ensembles" / f"{DIFFUSION}+{STOCK}" / "ddim" / "seed_0").glob("*.nii.gz")):
        case = segmentation.name[:-len(".nii.gz")]
        mean = (np.load(predictions / DIFFUSION / "ddim" / "seed_0" / f"{case}.npz")["probabilities"]
                + np.load(predictions / STOCK / f"{case}.npz")["probabilities"]) / 2
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation))), mean.argmax(0))


@pytest.mark.parametrize("trainers, baseline, match", [
    ([DIFFUSION, "nnUNetTrainerDoesNotExist"], STOCK, "no trainer class 'nnUNetTrainerDoesNotExist'"),
    ([STOCK], DIFFUSION, f"--baseline {DIFFUSION} is a diffusion trainer"),
])
def test_bad_trainer_names_fail_before_any_training(demo_dataset, tmp_path, monkeypatch, trainers, baseline, match):
    monkeypatch.setattr(ablation, "run_training", lambda job, env: pytest.fail(f"started {job.command}"))
    with pytest.raises(SystemExit, match=match):
        ablate.main(["-d", str(demo_dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", *trainers,
                     "--baseline", baseline, "-i", str(demo_dataset.test_images), "-r", str(demo_dataset.test_labels),
                     "-o", str(tmp_path), "-device", "cpu"])
