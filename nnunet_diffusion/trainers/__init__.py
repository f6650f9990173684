"""All trainers of the plugin, re-exported by the shim folder that `nnUNet_extTrainer` points at."""
from nnunet_diffusion.trainers.segmentation import SEGMENTATION_TRAINERS

globals().update({cls.__name__: cls for cls in SEGMENTATION_TRAINERS})
__all__ = [cls.__name__ for cls in SEGMENTATION_TRAINERS]
