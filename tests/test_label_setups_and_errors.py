"""Label setups the diffusion trainers support (regions, ignore label) and the ones they reject, with messages."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_diffusion.trainers.segmentation import nnUNetTrainerDiffRecycle
from nnunet_runs import CONFIGURATION, PLANS, make_dataset, model_folder, predict, train_in_process


def _with_ignore_slab(labels: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    labels[:3] = 3  # the first slices are unannotated
    return labels


@pytest.fixture(scope="module")
def region_dataset(nnunet_workspace):
    """Region-based labels (sigmoid, BraTS-style nested regions) with an ignore label."""
    return make_dataset(991, "Regions", num_train=5, num_test=1, label_transform=_with_ignore_slab,
                        dataset_json_update={"labels": {"background": 0, "objects": [1, 2], "box": [2], "ignore": 3},
                                             "regions_class_order": [1, 2]})


@pytest.fixture(scope="module")
def ignore_dataset(nnunet_workspace):
    """Classes (softmax) with an ignore label."""
    return make_dataset(992, "Ignore", num_train=5, num_test=1, label_transform=_with_ignore_slab,
                        dataset_json_update={"labels": {"background": 0, "ball": 1, "box": 2, "ignore": 3}})


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerDiffRecycle", "nnUNetTrainerDiffRecycleFocal"])
@pytest.mark.parametrize("dataset_fixture", ["region_dataset", "ignore_dataset"])
def test_regions_and_ignore_label_train_and_predict(request, dataset_fixture, trainer_name, tmp_path):
    dataset = request.getfixturevalue(dataset_fixture)
    trainer = train_in_process(dataset, trainer_name, iterations=2)
    expected_activation = "sigmoid" if dataset_fixture == "region_dataset" else "softmax"
    assert trainer.network.codec.activation == expected_activation
    assert np.isfinite(trainer.logger.get_value("train_losses", step=-1))
    predict(dataset, trainer_name, tmp_path / "pred", extra=["--disable_tta", "--save_probabilities"])
    (prediction,) = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))))) <= {0, 1, 2}
    probabilities = np.load(str(prediction).replace(".nii.gz", ".npz"))["probabilities"]
    assert probabilities.shape[0] == (2 if dataset_fixture == "region_dataset" else 3)  # regions or classes
    assert np.isfinite(probabilities).all()


def _plans_and_dataset_json(dataset):
    folder = os.path.join(os.environ["nnUNet_preprocessed"], dataset.name)
    plans = json.load(open(f"{folder}/{PLANS}.json"))
    return plans, json.load(open(f"{folder}/dataset.json"))


def test_checkpoint_of_another_diffusion_trainer_is_refused_with_the_right_trainer_named(demo_dataset):
    train_in_process(demo_dataset, "nnUNetTrainerDiffSelfCond", iterations=1)
    checkpoint = model_folder(demo_dataset, "nnUNetTrainerDiffSelfCond") / "fold_0" / "checkpoint_final.pth"
    plans, dataset_json = _plans_and_dataset_json(demo_dataset)
    trainer = nnUNetTrainerDiffRecycle({**plans, "continue_training": True}, CONFIGURATION, 0, dataset_json,
                                       torch.device("cpu"))
    with pytest.raises(RuntimeError, match="written by nnUNetTrainerDiffSelfCond and does not fit "
                                           "nnUNetTrainerDiffRecycle.*shape.*-tr nnUNetTrainerDiffSelfCond"):
        trainer.load_checkpoint(str(checkpoint))
