"""nnU-Net's 2d configuration with the cpu_2d preset: diffusion trainers (FiLM on InstanceNorm2d, 2D deep
supervision) train in nnU-Net's loop and predict volumes slice by slice with the stock nnUNetv2_predict."""
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.plans import write_preset_plans
from nnunet_diffusion.training import TrainingRun, train
from nnunet_diffusion.utils import TrainingBudget
from nnunet_runs import PLANS, run

CONFIGURATION = "2d_cpu"


@pytest.fixture(scope="module")
def dataset_2d(demo_dataset):
    """The demo dataset preprocessed for nnU-Net's 2d configuration, with cpu_2d added to its CPU plans."""
    run(["nnUNetv2_preprocess", "-d", str(demo_dataset.dataset_id), "-c", "2d", "-np", "2"])
    write_preset_plans(Path(os.environ["nnUNet_preprocessed"]) / demo_dataset.name, "cpu_2d")
    return demo_dataset


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerDiffRecycle", "nnUNetTrainerDiffRecycleDS"])
def test_2d_diffusion_trainers_train_and_predict_with_stock_nnunetv2_predict(dataset_2d, trainer_name, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    train(TrainingRun(str(dataset_2d.dataset_id), CONFIGURATION, 0, trainer_name, PLANS, TrainingBudget(1, 2, 1)))
    run(["nnUNetv2_predict", "-i", str(dataset_2d.test_images), "-o", str(tmp_path), "-d",
         str(dataset_2d.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", trainer_name, "-f", "0",
         "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"], env={"nnUNet_diffusion_steps": "2"})
    for image in sorted(dataset_2d.test_images.glob("*.nii.gz")):
        prediction = sitk.ReadImage(str(tmp_path / image.name.replace("_0000", "")))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}
