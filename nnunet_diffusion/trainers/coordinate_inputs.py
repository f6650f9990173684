"""What trainers reading coordinate channels change in nnU-Net's training: a dataset check and augmentation.

nnU-Net's spatial augmentation (rotation, scaling, elastic, mirroring) moves the coordinate channels with the
image, which is right: a voxel keeps its anatomical coordinates wherever the transform puts it. Its intensity
augmentation (noise, blur, brightness, contrast, low resolution, gamma) would rescale or blur positions, so it is
applied to the image channels only.
"""
from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnunet_diffusion.pretraining.coordinate_modulation import COORDINATE_CHANNELS, coordinate_channel_problem

INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


class ImageChannelsOnly(BasicTransform):
    """Runs a transform on the image channels of a sample and leaves its last COORDINATE_CHANNELS untouched."""

    def __init__(self, transform: BasicTransform):
        super().__init__()
        self.transform = transform

    def __call__(self, **data_dict) -> dict:
        image = data_dict["image"]
        changed = self.transform(**{**data_dict, "image": image[:-COORDINATE_CHANNELS]})
        return {**changed, "image": torch.cat([changed["image"], image[-COORDINATE_CHANNELS:]])}


def is_intensity_transform(transform: BasicTransform) -> bool:
    inner = transform.transform if isinstance(transform, RandomTransform) else transform
    return isinstance(inner, INTENSITY_TRANSFORMS)


def keep_coordinates_out_of_intensity_augmentation(transforms: BasicTransform) -> BasicTransform:
    """nnU-Net's training transforms with every intensity transform restricted to the image channels."""
    if not isinstance(transforms, ComposeTransforms):
        return ImageChannelsOnly(transforms) if is_intensity_transform(transforms) else transforms
    return ComposeTransforms([ImageChannelsOnly(t) if is_intensity_transform(t) else t for t in transforms.transforms])


def check_coordinate_channels(dataset_json: dict, reads_coordinates: bool, trainer_name: str) -> None:
    """Refuse a dataset whose coordinate channels the trainer would miss or mistake for image."""
    problem = coordinate_channel_problem(dataset_json, reads_coordinates, trainer_name)
    if problem is not None:
        raise ValueError(problem)


class CoordinateChannelsMixin:
    """For trainers with a `backbone` spec (pretraining and probes): the dataset check at construction, and
    nnU-Net's training transforms with intensity augmentation kept off the coordinate channels."""
    backbone: object

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        check_coordinate_channels(dataset_json, self.backbone.coordinates, type(self).__name__)
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def get_training_transforms(cls, *args, **kwargs) -> BasicTransform:
        transforms = super().get_training_transforms(*args, **kwargs)
        return keep_coordinates_out_of_intensity_augmentation(transforms) if cls.backbone.coordinates else transforms
