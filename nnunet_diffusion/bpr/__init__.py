"""Self-supervised 3-axis Body Part Regressor (BPR): anatomical coordinates that guide diffusion pretraining.

The nnU-Net trainer lives in nnunet_diffusion.trainers.bpr (with the plugin's other trainers); reading
its checkpoints (load_bpr_from_nnunet_checkpoint) needs only this package.
"""
from nnunet_diffusion.bpr.model import (AXIS_NAMES, BPRConfig, BPRModel, build_bpr, load_bpr,
                                        load_bpr_from_nnunet_checkpoint, save_bpr)
from nnunet_diffusion.bpr.body_coordinates import ordering_spearman
from nnunet_diffusion.bpr.training import BPRLossWeights, bpr_loss, train_bpr

__all__ = ["AXIS_NAMES", "BPRConfig", "BPRModel", "BPRLossWeights", "bpr_loss", "build_bpr", "load_bpr",
           "load_bpr_from_nnunet_checkpoint", "ordering_spearman", "save_bpr", "train_bpr"]
