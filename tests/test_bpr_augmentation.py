"""The BPR's augmentation is nnU-Net's intensity augmentation, taken from nnU-Net's own transform list: the same
transforms, probabilities and parameters, and none of the spatial ones that would scramble the anatomical order."""
from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_diffusion.trainers.bpr import nnUNetTrainerBPR

PATCH_SIZE = (16, 20, 24)
# nnU-Net 2.8's default intensity augmentation, in its order (gamma twice: on the inverted and on the plain image)
NNUNET_INTENSITY = ["GaussianNoiseTransform", "GaussianBlurTransform", "MultiplicativeBrightnessTransform",
                    "ContrastTransform", "SimulateLowResolutionTransform", "GammaTransform", "GammaTransform"]
NNUNET_SPATIAL_AND_LABEL = {"SpatialTransform", "MirrorTransform", "RemoveLabelTransform"}


def _parameters(value: object) -> object:
    """A transform's settings as plain values, so that two separately built transforms compare equal."""
    if isinstance(value, (list, tuple)):
        return type(value)(_parameters(v) for v in value)
    if isinstance(value, dict):
        return {k: _parameters(v) for k, v in value.items()}
    if hasattr(value, "__dict__"):
        return type(value).__name__, _parameters(vars(value))
    return value


def _described(transform: BasicTransform) -> tuple[str, float, object]:
    """(the transform's class, the probability it is applied with, its parameters)."""
    inner = transform.transform if isinstance(transform, RandomTransform) else transform
    probability = transform.apply_probability if isinstance(transform, RandomTransform) else 1.0
    return type(inner).__name__, probability, _parameters(inner)


def test_the_bpr_augments_with_nnunets_intensity_transforms_and_parameters():
    nnunet = [_described(t) for t in nnUNetTrainer.get_training_transforms(PATCH_SIZE, (-0.5, 0.5), None, (0, 1, 2),
                                                                          False).transforms]
    assert {name for name, _, _ in nnunet} - set(NNUNET_INTENSITY) == NNUNET_SPATIAL_AND_LABEL
    intensity = [d for d in nnunet if d[0] in NNUNET_INTENSITY]
    assert [name for name, _, _ in intensity] == NNUNET_INTENSITY
    # the BPR's own call (see nnUNetTrainerBPR.get_dataloaders): no rotation, no mirroring
    bpr = nnUNetTrainerBPR.get_training_transforms(PATCH_SIZE, (0.0, 0.0), None, None, False)
    assert [_described(t) for t in bpr.transforms] == intensity


def test_the_bpr_augmentation_keeps_a_whole_case_in_place():
    torch.manual_seed(0)
    np.random.seed(0)
    augmentation = nnUNetTrainerBPR.get_training_transforms(PATCH_SIZE, (0.0, 0.0), None, None, False)
    case = torch.rand(1, 12, 30, 18)  # another shape than the patch: whole cases keep their own
    augmented = augmentation(image=case.clone())["image"]
    assert augmented.shape == case.shape
    assert torch.isfinite(augmented).all()
