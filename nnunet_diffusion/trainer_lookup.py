"""Trainer names resolved as `nnUNetv2_train -tr` resolves them, before anything is trained, so that a typo or a
diffusion baseline fails in seconds with the fix named."""
from __future__ import annotations

import os
from collections.abc import Sequence

from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE


def trainer_class(name: str) -> type:
    """nnU-Net's own lookup (nnunetv2 and `nnUNet_extTrainer`)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise ValueError(f"nnU-Net finds no trainer class {name!r} (neither in nnunetv2 nor in "
                         f"nnUNet_extTrainer={os.environ.get(EXT_TRAINER_VARIABLE, '')}); check the spelling, "
                         f"or run `eval \"$(nnunet-diffusion env)\"`") from None


def is_diffusion_trainer(cls: type) -> bool:
    from nnunet_diffusion.trainers.segmentation import nnUNetTrainerDiff
    return issubclass(cls, nnUNetTrainerDiff)


def diffusion_trainers(trainers: Sequence[str], baseline: str) -> frozenset[str]:
    """The diffusion trainers among `trainers`, after checking that every name resolves and that the baseline,
    which every diffusion model is ensembled with, is not one."""
    classes = {name: trainer_class(name) for name in dict.fromkeys([baseline, *trainers])}
    if is_diffusion_trainer(classes[baseline]):
        raise ValueError(f"--baseline {baseline} is a diffusion trainer; the ensembles need a non-diffusion one, "
                         f"e.g. nnUNetTrainer")
    return frozenset(name for name, cls in classes.items() if is_diffusion_trainer(cls))
