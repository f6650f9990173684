"""The trainer classes a module defines, read from the module: the exported lists are derived, never written
out, so a class added to a family module reaches the shims and `nnUNetv2_train -tr` without further edits."""
from __future__ import annotations

from collections.abc import Mapping

from nnunet_diffusion.trainers.base import PluginTrainer

TRAINER_PREFIX = "nnUNetTrainer"  # nnU-Net's naming; mixins and shared bases (StockStart, PretrainingTrainer) lack it


def trainers_defined_in(namespace: Mapping[str, object]) -> list[type[PluginTrainer]]:
    """The `nnUNetTrainer…` PluginTrainer subclasses defined in the module whose namespace this is (`globals()`
    or `vars(module)`), in definition order; imported classes are left to the module that defines them."""
    return [value for value in namespace.values()
            if isinstance(value, type) and issubclass(value, PluginTrainer)
            and value.__module__ == namespace["__name__"] and value.__name__.startswith(TRAINER_PREFIX)]
