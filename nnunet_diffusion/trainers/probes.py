"""Probe and fine-tuning trainers: they evaluate a pretraining checkpoint (see `pretraining.py`).

They take a pretraining checkpoint through `nnUNetv2_train ... -pretrained_weights FILE` (see network.py for how
the keys line up) and predict with the stock `nnUNetv2_predict`. The suffix (none, `Coord`, `Restore`,
`RestoreCoord`) must match the pretraining that wrote the checkpoint (any of its variants); the `Coord` ones read
the dataset's coordinate channels, as their pretraining did.

- `nnUNetTrainerProbeNonLinear*` (per-voxel MLP) and `nnUNetTrainerProbeLinear*` (linear) train a head on the
  frozen multi-scale decoder features of the clean image at t = 0.
- `nnUNetTrainerPretrainedFinetune*` fine-tune the whole pretrained network as nnU-Net fine-tunes
  (`PretrainedFinetuneTrainer`); `nnUNetTrainerPretrainedFinetuneRandomInit*` train the same network on the same
  schedule from random weights, the control that isolates what the pretrained weights add.
- `nnUNetTrainerFinetune*` are the old names of an earlier fine-tuning (a linear head on the decoder features),
  kept so that their checkpoints still predict and their runs resume.
"""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_diffusion.pretraining.lr_schedule import WarmupPolyLRScheduler, warmup_epochs
from nnunet_diffusion.pretraining.network import (DIFFUSION, DIFFUSION_COORD, RESTORATIVE, RESTORATIVE_COORD,
                                                  BackboneSpec, build_finetune_network, build_probe_network)
from nnunet_diffusion.trainer_support import unwrap
from nnunet_diffusion.trainers.base import PluginTrainer
from nnunet_diffusion.trainers.coordinate_inputs import CoordinateChannelsMixin
from nnunet_diffusion.trainers.pretraining import nnUNetTrainerDiffPretrain
from nnunet_diffusion.trainers.registry import trainers_defined_in


class PretrainedBackboneTrainer(CoordinateChannelsMixin, PluginTrainer):
    """Shared by probes and fine-tuning: a network with the backbone keys of `backbone`'s pretraining network,
    trained from `learning_rate`, and a check before training that `-pretrained_weights` filled it."""
    backbone: BackboneSpec
    learning_rate: float

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.learning_rate

    def on_train_start(self) -> None:
        """nnU-Net copies `-pretrained_weights` in after initialize() and before this; only a pretraining
        checkpoint sets `holds_pretrained_weights` (and a resumed run's own checkpoint keeps it)."""
        if not self.was_initialized:
            self.initialize()
        self.check_start_weights(bool(unwrap(self.network).holds_pretrained_weights))
        super().on_train_start()

    def check_start_weights(self, holds_pretrained_weights: bool) -> None:
        """Refuse to train on a random backbone."""
        if not holds_pretrained_weights:
            pretrainer = self.backbone.pretraining_trainer
            raise RuntimeError(
                f"{type(self).__name__} trains on a pretrained backbone but got none: add -pretrained_weights "
                f"<results>/<dataset>/{pretrainer}__<plans>__<configuration>/fold_<f>/checkpoint_final.pth "
                f"(a checkpoint of {pretrainer} or one of its variants) to nnUNetv2_train")


class ProbeTrainer(PretrainedBackboneTrainer):
    """A head on the decoder features of the backbone, which is frozen unless `freeze_backbone` is off."""
    head_kind = "nonlinear"
    freeze_backbone = True
    learning_rate = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

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


class PretrainedFinetuneTrainer(PretrainedBackboneTrainer):
    """Fine-tuning of the whole pretrained network, as nnU-Net fine-tunes from a pretrained checkpoint.

    The network is the dataset's planned UNet with the pretraining's conditioning layers (FiLM at t = 0, the
    coordinate modulation), every tensor taken from `-pretrained_weights` but the output layers, which nnU-Net's
    loader never copies (here they output the classes, the pretext's the image); deep supervision, loss,
    augmentation, SGD and 1000 epochs are stock nnU-Net's. The learning rate is 1e-3, a tenth of nnU-Net's
    from-scratch 1e-2, as nnU-Net's `PretrainedTrainer` fine-tunes CNN checkpoints: it adapts the pretrained
    weights instead of washing them out. It warms up linearly over the first 5 % of the epochs (50 of 1000, as
    there), while the new output layers, whose gradients are large at first, fit the features; nnU-Net's poly
    schedule follows over the remaining epochs."""
    learning_rate = 1e-3
    warmup_fraction = 0.05
    untrained_timesteps = nnUNetTrainerDiffPretrain.num_timesteps  # embeds t = 0 until the checkpoint's T is in

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_finetune_network(cls.backbone, plans_manager, configuration_manager, num_input_channels,
                                      num_output_channels, enable_deep_supervision, cls.untrained_timesteps)

    def configure_optimizers(self):
        """nnU-Net's SGD over every parameter, on the warm-up + poly schedule."""
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs,
                                                warmup_epochs(self.num_epochs, self.warmup_fraction))


class RandomInit:
    """Mixin for a fine-tuning trainer: its control, the identical network and schedule from nnU-Net's random
    initialisation, so that comparing the two isolates what the pretrained weights add."""
    backbone: BackboneSpec

    def check_start_weights(self, holds_pretrained_weights: bool) -> None:
        """Refuse pretrained weights, which would make the control a copy of the fine-tuning."""
        if holds_pretrained_weights:
            raise RuntimeError(
                f"{type(self).__name__} trains from random weights, but -pretrained_weights filled its network: "
                f"drop -pretrained_weights, or train nnUNetTrainerPretrainedFinetune{self.backbone.trainer_suffix} "
                f"to start from them")


class LinearHeadFinetune(ProbeTrainer):
    """The earlier fine-tuning: the backbone and a linear head on its decoder features, all trained at lr 1e-3 on
    nnU-Net's poly schedule, without deep supervision."""
    head_kind = "linear"
    freeze_backbone = False
    learning_rate = 1e-3


class nnUNetTrainerProbeNonLinear(ProbeTrainer):
    """Non-linear probe (per-voxel MLP) on a frozen nnUNetTrainerDiffPretrain backbone."""
    backbone = DIFFUSION


class nnUNetTrainerProbeLinear(ProbeTrainer):
    """Linear probe on a frozen nnUNetTrainerDiffPretrain backbone."""
    backbone = DIFFUSION
    head_kind = "linear"


class nnUNetTrainerPretrainedFinetune(PretrainedFinetuneTrainer):
    """Fine-tuning of a nnUNetTrainerDiffPretrain network."""
    backbone = DIFFUSION


class nnUNetTrainerProbeNonLinearCoord(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerDiffPretrainCoord backbone (reads the coordinate channels)."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerProbeLinearCoord(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerDiffPretrainCoord backbone."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerPretrainedFinetuneCoord(PretrainedFinetuneTrainer):
    """Fine-tuning of a nnUNetTrainerDiffPretrainCoord network."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerProbeNonLinearRestore(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


class nnUNetTrainerProbeLinearRestore(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


class nnUNetTrainerPretrainedFinetuneRestore(PretrainedFinetuneTrainer):
    """Fine-tuning of a nnUNetTrainerRestorePretrain network."""
    backbone = RESTORATIVE


class nnUNetTrainerProbeNonLinearRestoreCoord(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerRestorePretrainCoord backbone."""
    backbone = RESTORATIVE_COORD


class nnUNetTrainerProbeLinearRestoreCoord(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerRestorePretrainCoord backbone."""
    backbone = RESTORATIVE_COORD


class nnUNetTrainerPretrainedFinetuneRestoreCoord(PretrainedFinetuneTrainer):
    """Fine-tuning of a nnUNetTrainerRestorePretrainCoord network."""
    backbone = RESTORATIVE_COORD


class nnUNetTrainerPretrainedFinetuneRandomInit(RandomInit, nnUNetTrainerPretrainedFinetune):
    """nnUNetTrainerPretrainedFinetune from random weights."""


class nnUNetTrainerPretrainedFinetuneRandomInitCoord(RandomInit, nnUNetTrainerPretrainedFinetuneCoord):
    """nnUNetTrainerPretrainedFinetuneCoord from random weights."""


class nnUNetTrainerPretrainedFinetuneRandomInitRestore(RandomInit, nnUNetTrainerPretrainedFinetuneRestore):
    """nnUNetTrainerPretrainedFinetuneRestore from random weights."""


class nnUNetTrainerPretrainedFinetuneRandomInitRestoreCoord(RandomInit, nnUNetTrainerPretrainedFinetuneRestoreCoord):
    """nnUNetTrainerPretrainedFinetuneRestoreCoord from random weights."""


class nnUNetTrainerFinetune(LinearHeadFinetune):
    """Old name of the linear-head fine-tuning of a nnUNetTrainerDiffPretrain backbone, kept so existing
    checkpoints predict; fine-tune with nnUNetTrainerPretrainedFinetune."""
    backbone = DIFFUSION


class nnUNetTrainerFinetuneCoord(LinearHeadFinetune):
    """Old name of the linear-head fine-tuning of a nnUNetTrainerDiffPretrainCoord backbone, kept so existing
    checkpoints predict; fine-tune with nnUNetTrainerPretrainedFinetuneCoord."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerFinetuneRestore(LinearHeadFinetune):
    """Old name of the linear-head fine-tuning of a nnUNetTrainerRestorePretrain backbone, kept so existing
    checkpoints predict; fine-tune with nnUNetTrainerPretrainedFinetuneRestore."""
    backbone = RESTORATIVE


class nnUNetTrainerFinetuneRestoreCoord(LinearHeadFinetune):
    """Old name of the linear-head fine-tuning of a nnUNetTrainerRestorePretrainCoord backbone, kept so existing
    checkpoints predict; fine-tune with nnUNetTrainerPretrainedFinetuneRestoreCoord."""
    backbone = RESTORATIVE_COORD


OLD_NAME_TRAINERS = [cls for cls in trainers_defined_in(globals()) if issubclass(cls, LinearHeadFinetune)]
PROBE_TRAINERS = [cls for cls in trainers_defined_in(globals()) if cls not in OLD_NAME_TRAINERS]
__all__ = [cls.__name__ for cls in PROBE_TRAINERS + OLD_NAME_TRAINERS]
