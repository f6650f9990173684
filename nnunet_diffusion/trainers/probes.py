"""Probe and fine-tuning trainers: they evaluate a pretraining checkpoint (see `pretraining.py`).

Probing and fine-tuning take a pretraining checkpoint through `nnUNetv2_train ... -pretrained_weights FILE`
(see network.py for how the keys line up) and predict with the stock `nnUNetv2_predict`:
`nnUNetTrainerProbeNonLinear*` (per-voxel MLP) and `nnUNetTrainerProbeLinear*` (linear) train a head on the
frozen multi-scale decoder features of the clean image at t = 0; `nnUNetTrainerFinetune*` trains everything at lr
1e-3 with the linear head. The suffix (none, `Coord`, `Restore`, `RestoreCoord`) must match the pretraining that
wrote the checkpoint (any of its variants); the `Coord` ones read the dataset's coordinate channels, as their
pretraining did.
"""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_diffusion.pretraining.network import (DIFFUSION, DIFFUSION_COORD, RESTORATIVE, RESTORATIVE_COORD,
                                                  BackboneSpec, build_probe_network)
from nnunet_diffusion.trainer_support import unwrap
from nnunet_diffusion.trainers.base import PluginTrainer
from nnunet_diffusion.trainers.coordinate_inputs import CoordinateChannelsMixin


class ProbeTrainer(CoordinateChannelsMixin, PluginTrainer):
    """Shared by probes and fine-tuning: a head on a backbone that must come from `-pretrained_weights`."""
    backbone: BackboneSpec
    head_kind = "nonlinear"
    freeze_backbone = True
    learning_rate = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = self.learning_rate

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_probe_network(cls.backbone, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, cls.head_kind, cls.freeze_backbone)

    def _do_i_compile(self) -> bool:
        """Off: decoder features are captured by forward hooks registered per call, which torch.compile would
        have to re-trace; the frozen backbone gains little from compiling."""
        return False

    def configure_optimizers(self):
        """nnU-Net's SGD + poly schedule over the trainable parameters only (the head, or everything)."""
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def on_train_start(self) -> None:
        """Refuse to train on a random backbone: nnU-Net copies `-pretrained_weights` in after initialize() and
        before this, and only a pretraining checkpoint sets `holds_pretrained_weights`."""
        if not self.was_initialized:
            self.initialize()
        if not bool(unwrap(self.network).holds_pretrained_weights):
            pretrainer = self.backbone.pretraining_trainer
            raise RuntimeError(
                f"{type(self).__name__} trains on a pretrained backbone but got none: add -pretrained_weights "
                f"<results>/<dataset>/{pretrainer}__<plans>__<configuration>/fold_<f>/checkpoint_final.pth "
                f"(a checkpoint of {pretrainer} or one of its variants) to nnUNetv2_train")
        super().on_train_start()


class nnUNetTrainerProbeNonLinear(ProbeTrainer):
    """Non-linear probe (per-voxel MLP) on a frozen nnUNetTrainerDiffPretrain backbone."""
    backbone = DIFFUSION


class nnUNetTrainerProbeLinear(ProbeTrainer):
    """Linear probe on a frozen nnUNetTrainerDiffPretrain backbone."""
    backbone = DIFFUSION
    head_kind = "linear"


class nnUNetTrainerFinetune(ProbeTrainer):
    """Fine-tuning of a nnUNetTrainerDiffPretrain backbone with a linear head, lr 1e-3."""
    backbone = DIFFUSION
    head_kind = "linear"
    freeze_backbone = False
    learning_rate = 1e-3


class nnUNetTrainerProbeNonLinearCoord(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerDiffPretrainCoord backbone (reads the coordinate channels)."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerProbeLinearCoord(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerDiffPretrainCoord backbone."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerFinetuneCoord(nnUNetTrainerFinetune):
    """Fine-tuning of a nnUNetTrainerDiffPretrainCoord backbone."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerProbeNonLinearRestore(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


class nnUNetTrainerProbeLinearRestore(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


class nnUNetTrainerFinetuneRestore(nnUNetTrainerFinetune):
    """Fine-tuning of a nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


class nnUNetTrainerProbeNonLinearRestoreCoord(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerRestorePretrainCoord backbone."""
    backbone = RESTORATIVE_COORD


class nnUNetTrainerProbeLinearRestoreCoord(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerRestorePretrainCoord backbone."""
    backbone = RESTORATIVE_COORD


class nnUNetTrainerFinetuneRestoreCoord(nnUNetTrainerFinetune):
    """Fine-tuning of a nnUNetTrainerRestorePretrainCoord backbone."""
    backbone = RESTORATIVE_COORD


PROBE_TRAINERS = [c for c in list(globals().values())
                  if isinstance(c, type) and issubclass(c, ProbeTrainer) and c.__module__ == __name__
                  and c is not ProbeTrainer]
__all__ = [cls.__name__ for cls in PROBE_TRAINERS]
