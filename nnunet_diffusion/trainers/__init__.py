"""All trainers of the plugin, one module per family, re-exported by the shim folder that `nnUNet_extTrainer`
points at. Each derives from `base.PluginTrainer`."""
from nnunet_diffusion.trainers.bpr import nnUNetTrainerBPR, nnUNetTrainerBPR_smoke
from nnunet_diffusion.trainers.finetune import FINETUNE_TRAINERS
from nnunet_diffusion.trainers.pretraining import PRETRAINING_TRAINERS
from nnunet_diffusion.trainers.probes import PROBE_TRAINERS
from nnunet_diffusion.trainers.segmentation import SEGMENTATION_TRAINERS

ALL_TRAINERS = (SEGMENTATION_TRAINERS + FINETUNE_TRAINERS + [nnUNetTrainerBPR, nnUNetTrainerBPR_smoke]
                + PRETRAINING_TRAINERS + PROBE_TRAINERS)
globals().update({cls.__name__: cls for cls in ALL_TRAINERS})
__all__ = [cls.__name__ for cls in ALL_TRAINERS]
