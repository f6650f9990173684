"""Every segmentation trainer: found by nnU-Net, trained by nnU-Net's loop, predicted by the stock nnUNetv2_predict
(its entry point, in this process; tests/test_learning_and_prediction.py runs the command itself)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_diffusion.trainers import __all__ as TRAINER_NAMES
from nnunet_diffusion.trainers.segmentation import SEGMENTATION_TRAINERS
from nnunet_runs import mean_dice, predict_in_this_process, train_in_process


def test_nnunets_own_lookup_finds_every_trainer_through_the_shim_folder(nnunet_workspace):
    script = ("import json; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
              f"print(json.dumps({{n: f(n).__module__ for n in {TRAINER_NAMES!r}}}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(modules) == set(TRAINER_NAMES)
    assert all(m.startswith("nnunet_diffusion.") for m in modules.values())  # real classes, not the shims


def test_trainer_names_are_safe_for_nnunet_folder_names():
    assert all("__" not in name for name in TRAINER_NAMES)


@pytest.mark.parametrize("trainer_name", [c.__name__ for c in SEGMENTATION_TRAINERS])
def test_trains_and_predicts_with_stock_nnunetv2_predict(demo_dataset, trainer_name, tmp_path, monkeypatch):
    trainer = train_in_process(demo_dataset, trainer_name)
    checkpoint = torch.load(f"{trainer.output_folder}/checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == trainer_name
    logged = json.loads((Path(trainer.output_folder) / "loss_per_timestep.json").read_text())
    assert sum(logged["epochs"][0]["samples"]) == trainer.num_iterations_per_epoch * trainer.batch_size
    if trainer.timestep_sampling == "loss_aware":
        assert checkpoint["timestep_sampler"]["counts"].sum() == sum(logged["epochs"][0]["samples"])
    monkeypatch.setenv("nnUNet_diffusion_steps", "2")  # two sampling steps keep 36 predictions affordable
    predict_in_this_process(demo_dataset, trainer_name, tmp_path / "pred", extra=["--disable_tta"])
    for image in sorted(demo_dataset.test_images.glob("*.nii.gz")):
        prediction = sitk.ReadImage(str(tmp_path / "pred" / image.name.replace("_0000", "")))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}
    assert 0 <= mean_dice(demo_dataset, tmp_path / "pred") <= 1
