"""Diffusion segmentation trainers (Fu et al., MELBA 2023): one small class per training strategy or ablation.

All share `nnUNetTrainerDiff`: nnU-Net plans the network, loads and augments the data, runs validation and
prediction; the trainer only swaps in the time-conditioned denoiser and a `train_step` that asks its training
strategy for the inputs of the trained pass. Deep supervision is off: sampling uses only the full-resolution
x0 logits and the reference method has none (see docs/trainers.md).
"""

import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context, softmax_helper_dim1
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from nnunet_diffusion.core.losses import DiceFocalLoss
from nnunet_diffusion.core.masks import MaskCodec
from nnunet_diffusion.core.network import DiffusionSegmentationNetwork, build_unet_from_plans
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.core.strategies import (PlainDiffusion, Recycling, RecyclingNext, SelfConditioning,
                                              SelfConditioningNext, TrainingStrategy)
from nnunet_diffusion.trainer_support import backward_and_step, ensure_checkpoint_fits, unwrap


class nnUNetTrainerDiff(nnUNetTrainer):
    """Plain diffusion segmentation ('Diff.'): noise the ground truth at a random t, predict x0."""
    strategy_class: type[TrainingStrategy] = PlainDiffusion
    noise_schedule = "linear"
    num_timesteps = 5
    time_conditioning = True
    focal_loss = False
    training_epochs: int | None = None  # set by the short-schedule variants

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_cascaded:
            raise ValueError(f"{type(self).__name__} does not support cascaded configurations "
                             f"({configuration} uses the segmentation of {self.configuration_manager.previous_stage_name}); "
                             f"train a full-resolution configuration such as 3d_fullres")
        self.enable_deep_supervision = False
        if self.training_epochs is not None:
            self.num_epochs = self.training_epochs
        self.codec = MaskCodec(self.label_manager.num_segmentation_heads,
                               "sigmoid" if self.label_manager.has_regions else "softmax",
                               None if self.label_manager.has_regions else self.label_manager.ignore_label)
        self.strategy = self.strategy_class(DiffusionScheduler(make_alphas_cumprod(self.noise_schedule,
                                                                                   self.num_timesteps)), self.codec)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        mask_channels = num_output_channels * (2 if cls.strategy_class.needs_self_condition_channels else 1)
        unet = build_unet_from_plans(plans_manager, configuration_manager, num_input_channels + mask_channels,
                                     num_output_channels, enable_deep_supervision)
        return DiffusionSegmentationNetwork(unet, num_input_channels, MaskCodec(num_output_channels),
                                            make_alphas_cumprod(cls.noise_schedule, cls.num_timesteps),
                                            self_conditioning=cls.strategy_class.needs_self_condition_channels,
                                            time_conditioning=cls.time_conditioning)

    def initialize(self):
        super().initialize()
        unwrap(self.network).set_mask_activation(self.codec.activation)

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).set_deep_supervision_enabled(enabled)

    def _build_loss(self):
        if not self.focal_loss:
            return super()._build_loss()
        regions = self.label_manager.has_regions
        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid if regions else softmax_helper_dim1,
                                           batch_dice=self.configuration_manager.batch_dice, do_bg=regions,
                                           smooth=1e-5, ddp=self.is_ddp)
        return DiceFocalLoss(dice, self.codec.activation, ignore_label=self.codec.ignore_label,
                             has_ignore_channel=regions and self.label_manager.has_ignore_label)

    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target'].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            final = self.strategy.final_pass(self.codec.encode(target),
                                             lambda x_t, t, condition: self.network(data, x_t, t, condition))
            output = self.network(data, final.x_t, final.t, final.self_condition)
            loss = self.loss(output, target)
        backward_and_step(self, loss)
        return {'loss': loss.detach().cpu().numpy()}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        ensure_checkpoint_fits(self, checkpoint, f"checkpoint {filename_or_checkpoint}"
                               if isinstance(filename_or_checkpoint, str) else "the checkpoint")
        super().load_checkpoint(filename_or_checkpoint)


class nnUNetTrainerDiffSelfCond(nnUNetTrainerDiff):
    """Self-conditioning at x_t ('Diff. sc. x_t', Chen et al.)."""
    strategy_class = SelfConditioning


class nnUNetTrainerDiffSelfCondNext(nnUNetTrainerDiff):
    """Self-conditioning from x_{t+1} ('Diff. sc. x_{t+1}', Watson et al.)."""
    strategy_class = SelfConditioningNext


class nnUNetTrainerDiffRecycleNext(nnUNetTrainerDiff):
    """Recycling from x_{t+1} ('Diff. rec. x_{t+1}', the predecessor paper)."""
    strategy_class = RecyclingNext


class nnUNetTrainerDiffRecycle(nnUNetTrainerDiff):
    """Recycling from x_T ('Diff. rec. x_T'), the proposed method of Fu et al."""
    strategy_class = Recycling


class nnUNetTrainerDiffRecycleNoTime(nnUNetTrainerDiffRecycle):
    """Recycling without timestep conditioning, as the reference code effectively trains (ablation)."""
    time_conditioning = False


class nnUNetTrainerDiffRecycleFocal(nnUNetTrainerDiffRecycle):
    """Recycling with the paper's loss, Dice + 20·focal (γ = 2), instead of nnU-Net's Dice + CE."""
    focal_loss = True


def _short_schedule_variant(base: type, epochs: int) -> type:
    """`<base>_<N>epochs`, in nnU-Net's naming style (like nnUNetTrainer_5epochs), for quick runs."""
    name = f"{base.__name__}_{epochs}epoch{'s' if epochs != 1 else ''}"
    return type(name, (base,), {"training_epochs": epochs, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} trained for {epochs} epoch(s) only."})


STRATEGY_TRAINERS = [nnUNetTrainerDiff, nnUNetTrainerDiffSelfCond, nnUNetTrainerDiffSelfCondNext,
                     nnUNetTrainerDiffRecycleNext, nnUNetTrainerDiffRecycle]
SHORT_SCHEDULE_EPOCHS = (1, 5)
SHORT_SCHEDULE_TRAINERS = [_short_schedule_variant(base, epochs)
                           for base in STRATEGY_TRAINERS for epochs in SHORT_SCHEDULE_EPOCHS]
globals().update({cls.__name__: cls for cls in SHORT_SCHEDULE_TRAINERS})

SEGMENTATION_TRAINERS = STRATEGY_TRAINERS + [nnUNetTrainerDiffRecycleNoTime, nnUNetTrainerDiffRecycleFocal] \
    + SHORT_SCHEDULE_TRAINERS
