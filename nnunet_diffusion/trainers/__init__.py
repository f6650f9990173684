"""All trainers of the plugin, re-exported by the shim folder that `nnUNet_extTrainer` points at. Each derives
from `base.PluginTrainer`; the list is read from the family modules (`registry.trainers_defined_in`), so a class
added to one of them is exported, and found by `nnUNetv2_train -tr`, without an edit here."""
from nnunet_diffusion.trainers import (bpr, finetune, pretraining, pretraining_timesteps, probes, segmentation,
                                       training_length)
from nnunet_diffusion.trainers.registry import trainers_defined_in

FAMILY_MODULES = (segmentation, finetune, training_length, bpr, pretraining, pretraining_timesteps, probes)
ALL_TRAINERS = [cls for module in FAMILY_MODULES for cls in trainers_defined_in(vars(module))]
globals().update({cls.__name__: cls for cls in ALL_TRAINERS})
__all__ = [cls.__name__ for cls in ALL_TRAINERS]
