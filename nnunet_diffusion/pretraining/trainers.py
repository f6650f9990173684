"""Self-supervised pretraining trainers and the probe / fine-tuning trainers that evaluate them.

Pretraining (no labels needed; the label files nnU-Net requires are ignored):
- `nnUNetTrainerDiffPretrainBPR` (Li et al. 2025): x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε from the image patch x0,
  cosine schedule with T = 10 steps; the clean patch goes through a frozen BPR (never noised) and [x_t, BPR map]
  feed a time-conditioned UNet built from the plans, trained to predict ε with MSE (DDPM's objective).
  `_T1`, `_T100`, `_T1000` vary T. T = 1 is an edge case: its only step is almost pure noise (ᾱ = 0.001), so
  ε-prediction is nearly the identity there, which is the low end of the ablation.
- `nnUNetTrainerDiffPretrain` (+ `_T…`): the same without BPR.
- `nnUNetTrainerRestorePretrain`: Models Genesis restoration (see `restoration.py`), same UNet, no time input.

nnU-Net's data augmentation stays on: the BPR reads the same augmented patch, so spatial transforms keep it
aligned; intensity transforms only change the image the BPR reads, as they would at test time. Validation logs
nnU-Net's own keys with mean_fg_dice = −(validation pretext loss), so progress.png and checkpoint_best track the
loss; the final segmentation validation is replaced by `validation/pretext_validation.json`. Checkpoints are
written with CPU tensors, because `nnUNetv2_train -pretrained_weights` loads them without a map_location.

Probing and fine-tuning take a pretraining checkpoint through `nnUNetv2_train ... -pretrained_weights FILE`
(see network.py for how the keys line up) and predict with the stock `nnUNetv2_predict`:
`nnUNetTrainerProbeNonLinear*` (per-voxel MLP) and `nnUNetTrainerProbeLinear*` (linear) train a head on the
frozen multi-scale decoder features; `nnUNetTrainerFinetune*` trains everything but the BPR at lr 1e-3 with
the linear head. The suffix (none, `BPR`, `Restore`) must match the pretraining that wrote the checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p, save_json
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.pretraining.bpr_guidance import load_guidance_bpr
from nnunet_diffusion.pretraining.network import (DIFFUSION, DIFFUSION_BPR, RESTORATIVE, BackboneSpec,
                                                  build_pretraining_network, build_probe_network)
from nnunet_diffusion.pretraining.restoration import genesis_distort
from nnunet_diffusion.trainer_support import backward_and_step, unwrap

NOISE_SCHEDULE = "cosine"  # defined on exactly T steps, so valid for T = 1 … 1000


def _refuse_cascade(trainer: nnUNetTrainer) -> None:
    if trainer.is_cascaded:
        raise ValueError(f"{type(trainer).__name__} does not support cascaded configurations; train a "
                         f"full-resolution configuration such as 3d_fullres")


class PretrainingTrainer(nnUNetTrainer):
    """Shared by the pretraining trainers: a pretext loss instead of segmentation, CPU-portable checkpoints."""
    backbone: BackboneSpec
    objective: str
    num_timesteps: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _refuse_cascade(self)
        self.enable_deep_supervision = False

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_pretraining_network(cls.backbone, plans_manager, configuration_manager, num_input_channels,
                                         cls.num_timesteps)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        unwrap(self.network).set_deep_supervision_enabled(enabled)

    def _build_loss(self) -> nn.Module:
        return nn.MSELoss()

    def pretext_loss(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        bpr = unwrap(self.network).bpr
        if bpr is not None and not bool(bpr.loaded):  # a continued training has it from its checkpoint
            configuration = self.configuration_manager
            bpr.load_from(load_guidance_bpr(self.plans_manager.plans_name, self.configuration_name,
                                            configuration.data_identifier, configuration.patch_size,
                                            configuration.spacing))
        super().on_train_start()

    def _pretext_loss_in_precision(self, batch: dict) -> torch.Tensor:
        data = batch['data'].to(self.device, non_blocking=True)
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            return self.pretext_loss(data)

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._pretext_loss_in_precision(batch)
        backward_and_step(self, loss)
        return {'loss': loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        return {'loss': self._pretext_loss_in_precision(batch).detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        """nnU-Net's keys, with mean_fg_dice = −loss (no classes): higher is better, as checkpoint_best expects."""
        losses = collate_outputs(val_outputs)['loss']
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, losses)
            losses = np.vstack(gathered)
        loss = float(np.mean(losses))
        self.logger.log('mean_fg_dice', -loss, self.current_epoch)
        self.logger.log('dice_per_class_or_region', [], self.current_epoch)
        self.logger.log('val_losses', loss, self.current_epoch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """No segmentation to validate: record the pretext validation loss and how to use the checkpoint."""
        if self.local_rank != 0:
            return
        losses = self.logger.get_value('val_losses', step=None)
        folder = join(self.output_folder, 'validation')
        maybe_mkdir_p(folder)
        save_json({'trainer': type(self).__name__, 'epochs': len(losses), 'final_val_loss': float(losses[-1]),
                   'best_val_loss': float(np.min(losses)), 'objective': self.objective,
                   'usage': f"pretraining checkpoint, not a segmentation model: train "
                            f"{' or '.join(self.backbone.probe_trainers)} with -pretrained_weights "
                            f"{join(self.output_folder, 'checkpoint_final.pth')}"},
                  join(folder, 'pretext_validation.json'))

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, re-saved with CPU tensors when trained on an accelerator, so that
        `-pretrained_weights` (torch.load without map_location) also works on a CPU-only machine."""
        super().save_checkpoint(filename)
        if self.device.type != 'cpu' and self.local_rank == 0 and not self.disable_checkpointing:
            torch.save(torch.load(filename, map_location='cpu', weights_only=False), filename)


class nnUNetTrainerDiffPretrain(PretrainingTrainer):
    """Diffusion pretraining without guidance: predict ε from x_t (T = 10, cosine schedule)."""
    backbone = DIFFUSION
    objective = "MSE between predicted and true noise ε"
    num_timesteps = 10

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.scheduler = DiffusionScheduler(make_alphas_cumprod(NOISE_SCHEDULE, self.num_timesteps))

    def pretext_loss(self, data: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.num_timesteps, (data.shape[0],), device=data.device)
        noise = torch.randn_like(data)
        predicted_noise = self.network(data, self.scheduler.add_noise(data, noise, t), t)
        return self.loss(predicted_noise.float(), noise)


class nnUNetTrainerDiffPretrainBPR(nnUNetTrainerDiffPretrain):
    """Diffusion pretraining guided by a frozen BPR's coordinate map (Li et al. 2025); BPR from nnUNet_diffusion_bpr."""
    backbone = DIFFUSION_BPR


class nnUNetTrainerRestorePretrain(PretrainingTrainer):
    """Restorative baseline (Models Genesis): reconstruct the clean patch from a distorted one, MSE."""
    backbone = RESTORATIVE
    objective = "MSE between restored and clean patch"

    def pretext_loss(self, data: torch.Tensor) -> torch.Tensor:
        restored = self.network(data, genesis_distort(data))
        return self.loss(restored.float(), data)


def _timestep_variant(base: type, num_timesteps: int) -> type:
    name = f"{base.__name__}_T{num_timesteps}"
    return type(name, (base,), {"num_timesteps": num_timesteps, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} with T = {num_timesteps} diffusion steps (ablation)."})


TIMESTEP_ABLATION = (1, 100, 1000)  # T = 10 is the default of the base classes
TIMESTEP_VARIANTS = [_timestep_variant(base, steps)
                     for base in (nnUNetTrainerDiffPretrainBPR, nnUNetTrainerDiffPretrain)
                     for steps in TIMESTEP_ABLATION]
globals().update({cls.__name__: cls for cls in TIMESTEP_VARIANTS})


class ProbeTrainer(nnUNetTrainer):
    """Shared by probes and fine-tuning: a head on a backbone that must come from `-pretrained_weights`."""
    backbone: BackboneSpec
    head_kind = "nonlinear"
    freeze_backbone = True
    learning_rate = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _refuse_cascade(self)
        self.enable_deep_supervision = False
        self.initial_lr = self.learning_rate

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_probe_network(cls.backbone, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, cls.head_kind, cls.freeze_backbone)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        unwrap(self.network).set_deep_supervision_enabled(enabled)

    def _do_i_compile(self) -> bool:
        """Off: decoder features are captured by forward hooks registered per call, which torch.compile would
        have to re-trace; the frozen backbone gains little from compiling."""
        return False

    def configure_optimizers(self):
        """nnU-Net's SGD + poly schedule over the trainable parameters only (the head, or all but the BPR)."""
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
                f"(a checkpoint of {pretrainer} or one of its _T variants) to nnUNetv2_train")
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


class nnUNetTrainerProbeNonLinearBPR(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerDiffPretrainBPR backbone (with its BPR)."""
    backbone = DIFFUSION_BPR


class nnUNetTrainerProbeLinearBPR(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerDiffPretrainBPR backbone (with its BPR)."""
    backbone = DIFFUSION_BPR


class nnUNetTrainerFinetuneBPR(nnUNetTrainerFinetune):
    """Fine-tuning of a nnUNetTrainerDiffPretrainBPR backbone (the BPR stays frozen)."""
    backbone = DIFFUSION_BPR


class nnUNetTrainerProbeNonLinearRestore(nnUNetTrainerProbeNonLinear):
    """Non-linear probe on a frozen nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


class nnUNetTrainerProbeLinearRestore(nnUNetTrainerProbeLinear):
    """Linear probe on a frozen nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


class nnUNetTrainerFinetuneRestore(nnUNetTrainerFinetune):
    """Fine-tuning of a nnUNetTrainerRestorePretrain backbone."""
    backbone = RESTORATIVE


PRETRAINING_ONLY_TRAINERS = [nnUNetTrainerDiffPretrainBPR, nnUNetTrainerDiffPretrain, nnUNetTrainerRestorePretrain,
                             *TIMESTEP_VARIANTS]
PROBE_TRAINERS = [nnUNetTrainerProbeNonLinearBPR, nnUNetTrainerProbeLinearBPR, nnUNetTrainerFinetuneBPR,
                  nnUNetTrainerProbeNonLinear, nnUNetTrainerProbeLinear, nnUNetTrainerFinetune,
                  nnUNetTrainerProbeNonLinearRestore, nnUNetTrainerProbeLinearRestore, nnUNetTrainerFinetuneRestore]
PRETRAINING_TRAINERS = PRETRAINING_ONLY_TRAINERS + PROBE_TRAINERS
__all__ = [cls.__name__ for cls in PRETRAINING_TRAINERS]
