"""All trainers of the plugin, re-exported by the shim folder that `nnUNet_extTrainer` points at."""
from nnunet_diffusion.bpr.trainer import nnUNetTrainerBPR, nnUNetTrainerBPR_smoke
from nnunet_diffusion.pretraining.trainers import PRETRAINING_TRAINERS
from nnunet_diffusion.trainers.segmentation import SEGMENTATION_TRAINERS

ALL_TRAINERS = SEGMENTATION_TRAINERS + [nnUNetTrainerBPR, nnUNetTrainerBPR_smoke] + PRETRAINING_TRAINERS
globals().update({cls.__name__: cls for cls in ALL_TRAINERS})
__all__ = [cls.__name__ for cls in ALL_TRAINERS]
