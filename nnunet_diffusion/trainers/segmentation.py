"""Diffusion segmentation trainers (Fu et al., MELBA 2023): one small class per training strategy or ablation.

All share `nnUNetTrainerDiff`: nnU-Net plans the network, loads and augments the data, runs validation and
prediction; the trainer only swaps in the time-conditioned denoiser and a `train_step` that asks its training
strategy for the inputs of the trained pass. Options are class attributes, each with a trainer named after it:
deep supervision on the x0 logits (`...DS`), loss-aware timestep sampling (`...Importance`), recycling trained
at every t (`...AllT`), no time conditioning (`...NoTime`), Dice + focal loss (`...Focal`). Their `_1epoch` and
`_5epochs` copies for quick runs are in `training_length.py` (see docs/trainers.md).
"""

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_diffusion.core.diffusion_network import DiffusionSegmentationNetwork, is_default_sampling_key
from nnunet_diffusion.core.losses import DiceFocalLoss, per_sample_cross_entropy
from nnunet_diffusion.core.masks import MaskCodec, full_resolution
from nnunet_diffusion.core.sampling import SamplerSettings, check_environment
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.core.strategies import (PlainDiffusion, Recycling, RecyclingAllSteps, RecyclingNext,
                                              SelfConditioning, SelfConditioningNext, TrainingStrategy)
from nnunet_diffusion.core.timesteps import make_timestep_sampler
from nnunet_diffusion.core.unet_from_plans import build_unet_from_plans
from nnunet_diffusion.trainer_support import TimestepLossLog, unwrap
from nnunet_diffusion.trainers.base import PluginTrainer
from nnunet_diffusion.trainers.registry import trainers_defined_in

TIMESTEP_SAMPLER_KEY = "timestep_sampler"


def _sample(output: torch.Tensor | list[torch.Tensor], i: int) -> torch.Tensor | list[torch.Tensor]:
    """Sample i of a batch tensor or of nnU-Net's deep-supervision list, keeping the batch axis."""
    return [o[i:i + 1] for o in output] if isinstance(output, list) else output[i:i + 1]


class nnUNetTrainerDiff(PluginTrainer):
    """Plain diffusion segmentation ('Diff.'): noise the ground truth at a random t, predict x0."""
    strategy_class: type[TrainingStrategy] = PlainDiffusion
    noise_schedule = "linear"
    num_timesteps = 5
    time_conditioning = True
    focal_loss = False
    x0_deep_supervision = False  # nnU-Net's deep-supervision loss on the decoder's lower-resolution x0 logits
    timestep_sampling = "uniform"  # or "loss_aware" (see core/timesteps.py)
    # what plain nnUNetv2_predict runs, saved in the checkpoint (nnUNet_diffusion_* override it); None: all T steps
    default_sampling_steps: int | None = None
    default_sampler = "ddim"
    default_early_exit: float | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = self.x0_deep_supervision
        self.codec = MaskCodec(self.label_manager.num_segmentation_heads,
                               "sigmoid" if self.label_manager.has_regions else "softmax",
                               None if self.label_manager.has_regions else self.label_manager.ignore_label)
        self.strategy = self.strategy_class(DiffusionScheduler(make_alphas_cumprod(self.noise_schedule,
                                                                                   self.num_timesteps)), self.codec,
                                            make_timestep_sampler(self.timestep_sampling, self.num_timesteps))
        self.timestep_losses = TimestepLossLog(self.num_timesteps)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        check_environment(cls.num_timesteps)  # the predictor builds the network before it preprocesses
        mask_channels = num_output_channels * (2 if cls.strategy_class.needs_self_condition_channels else 1)
        unet = build_unet_from_plans(plans_manager, configuration_manager, num_input_channels + mask_channels,
                                     num_output_channels, enable_deep_supervision)
        return DiffusionSegmentationNetwork(unet, num_input_channels, MaskCodec(num_output_channels),
                                            make_alphas_cumprod(cls.noise_schedule, cls.num_timesteps),
                                            self_conditioning=cls.strategy_class.needs_self_condition_channels,
                                            time_conditioning=cls.time_conditioning,
                                            default_sampling=cls.default_sampling())

    @classmethod
    def default_sampling(cls) -> SamplerSettings:
        """The sampling this trainer's models predict with by default."""
        return SamplerSettings(cls.default_sampler, cls.default_sampling_steps or cls.num_timesteps, None,
                               cls.default_early_exit)

    def initialize(self):
        super().initialize()
        unwrap(self.network).set_mask_activation(self.codec.activation)

    def _build_loss(self):
        """nnU-Net's loss (with its deep-supervision weights when on); the focal variants swap the inner loss."""
        loss = super()._build_loss()
        if not self.focal_loss:
            return loss
        regions = self.label_manager.has_regions
        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid if regions else softmax_helper_dim1,
                                           batch_dice=self.configuration_manager.batch_dice, do_bg=regions,
                                           smooth=1e-5, ddp=self.is_ddp)
        focal = DiceFocalLoss(dice, self.codec.activation, ignore_label=self.codec.ignore_label,
                              has_ignore_channel=regions and self.label_manager.has_ignore_label)
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = focal
            return loss
        return focal

    def _per_sample_losses(self, output, target) -> torch.Tensor:
        """The training loss of every sample on its own: what the importance weights multiply."""
        return torch.stack([self.loss(_sample(output, i), _sample(target, i))
                            for i in range(full_resolution(target).shape[0])])

    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision():
            final = self.strategy.final_pass(self.codec.encode(full_resolution(target)),
                                             lambda x_t, t, condition: self.network(data, x_t, t, condition))
            output = self.network(data, final.x_t, final.t, final.self_condition)
            if final.weight is None:
                loss = self.loss(output, target)
            else:
                per_sample = self._per_sample_losses(output, target)
                loss = (per_sample * final.weight).mean()
        self.backward_and_step(loss)
        if self.strategy.timestep_sampler.needs_losses:
            self.strategy.timestep_sampler.update(final.t, per_sample)
        with torch.no_grad():
            self.timestep_losses.add(final.t, per_sample_cross_entropy(
                full_resolution(output), full_resolution(target), self.codec.activation, self.codec.ignore_label,
                self.label_manager.has_regions and self.label_manager.has_ignore_label))
        return {'loss': loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self.local_rank == 0:
            self.timestep_losses.write(self.output_folder, self.current_epoch)

    def plugin_checkpoint_state(self) -> dict:
        """The loss history of a loss-aware timestep sampler, so that --c resumes it."""
        state = self.strategy.timestep_sampler.state_dict()
        return {TIMESTEP_SAMPLER_KEY: state} if state else {}

    def load_plugin_checkpoint_state(self, checkpoint: dict) -> None:
        """The timestep sampler's history; and a checkpoint written before models carried their default sampling
        continues (`--c`) with this trainer's default rather than the all-T fallback of old checkpoints."""
        if TIMESTEP_SAMPLER_KEY in checkpoint:
            self.strategy.timestep_sampler.load_state_dict(checkpoint[TIMESTEP_SAMPLER_KEY])
        if not any(is_default_sampling_key(key) for key in checkpoint["network_weights"]):
            unwrap(self.network).set_default_sampling(self.default_sampling())


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


class nnUNetTrainerDiffDS(nnUNetTrainerDiff):
    """Plain diffusion with nnU-Net's deep supervision on the x0 logits (sampling uses the full-resolution head)."""
    x0_deep_supervision = True


class nnUNetTrainerDiffRecycleDS(nnUNetTrainerDiffRecycle):
    """Recycling with nnU-Net's deep supervision on the x0 logits of the trained pass."""
    x0_deep_supervision = True


class nnUNetTrainerDiffRecycleAllT(nnUNetTrainerDiffRecycle):
    """Recycling whose trained pass draws t from [0, T), so t = T−1, where sampling starts, is trained too."""
    strategy_class = RecyclingAllSteps


class nnUNetTrainerDiffImportance(nnUNetTrainerDiff):
    """Plain diffusion with the reference's loss-aware importance sampling of t (p_t ∝ sqrt(E[loss²]))."""
    timestep_sampling = "loss_aware"


class nnUNetTrainerDiffRecycleImportance(nnUNetTrainerDiffRecycle):
    """Recycling with the reference's loss-aware importance sampling of the trained pass's t."""
    timestep_sampling = "loss_aware"


STRATEGY_TRAINERS = [nnUNetTrainerDiff, nnUNetTrainerDiffSelfCond, nnUNetTrainerDiffSelfCondNext,
                     nnUNetTrainerDiffRecycleNext, nnUNetTrainerDiffRecycle]
SEGMENTATION_TRAINERS = trainers_defined_in(globals())
