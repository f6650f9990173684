"""All trainers of the plugin, re-exported by the shim folder that `nnUNet_extTrainer` points at."""
from nnunet_diffusion.bpr.trainer import nnUNetTrainerBPR, nnUNetTrainerBPR_smoke
from nnunet_diffusion.trainers.segmentation import SEGMENTATION_TRAINERS

ALL_TRAINERS = SEGMENTATION_TRAINERS + [nnUNetTrainerBPR, nnUNetTrainerBPR_smoke]
globals().update({cls.__name__: cls for cls in ALL_TRAINERS})
__all__ = [cls.__name__ for cls in ALL_TRAINERS]
