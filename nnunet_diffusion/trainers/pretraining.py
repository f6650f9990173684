"""Self-supervised pretraining trainers and the probe / fine-tuning trainers that evaluate them.

Pretraining (no labels needed; the label files nnU-Net requires are ignored, and patches are drawn at random,
never by label):
- `nnUNetTrainerDiffPretrainCoord` (Li et al. 2025): x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε from the image patch x0,
  DDPM's linear β (1e-4 … 0.02) over T = 10 steps, so T sets the largest noise (ᾱ ≥ 0.90 at T = 10); the
  dataset's anatomical coordinate channels (a BPR's, from `nnunet-diffusion add-coordinates`; never noised) go
  into a time-conditioned UNet built from the plans, as input channels and as a modulation after every
  normalisation, trained to predict ε with MSE (DDPM's objective). `…X0` predicts the clean patch instead (the
  usual choice for representation learning: an ε output never has to carry absolute intensity). Their copies
  with another T (the noise range), for the timestep ablation, are in `pretraining_timesteps.py`.
- `nnUNetTrainerDiffPretrain` (+ `X0`): the same without coordinates.
- `nnUNetTrainerRestorePretrain` (+ `Coord`): Models Genesis restoration (see `restoration.py`), same UNet, no
  time input.

nnU-Net's data augmentation stays on: spatial transforms move the coordinate channels with the image; intensity
transforms act on the image channels only (`coordinate_inputs.py`). Validation logs
nnU-Net's own keys with mean_fg_dice = −(validation pretext loss), so progress.png and checkpoint_best track the
loss; the final segmentation validation is replaced by `validation/pretext_validation.json`. Checkpoints are
written with CPU tensors, because `nnUNetv2_train -pretrained_weights` loads them without a map_location.

The probes and fine-tuning trainers that read these checkpoints are in `probes.py`.
"""
from __future__ import annotations

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p, save_json
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.pretraining.network import (DIFFUSION, DIFFUSION_COORD, RESTORATIVE, RESTORATIVE_COORD,
                                                  BackboneSpec, build_pretraining_network)
from nnunet_diffusion.pretraining.restoration import genesis_distort
from nnunet_diffusion.trainer_support import unwrap
from nnunet_diffusion.trainers.base import PluginTrainer
from nnunet_diffusion.trainers.coordinate_inputs import CoordinateChannelsMixin
from nnunet_diffusion.trainers.registry import trainers_defined_in


class PretrainingTrainer(CoordinateChannelsMixin, PluginTrainer):
    """Shared by the pretraining trainers: a pretext loss instead of segmentation, CPU-portable checkpoints."""
    backbone: BackboneSpec
    objective: str
    num_timesteps: int | None = None
    checkpoint_on_cpu = True  # `-pretrained_weights` (torch.load without map_location) works on a CPU-only machine

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.oversample_foreground_percent = 0.0  # self-supervised: no patch is chosen by its labels

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_pretraining_network(cls.backbone, plans_manager, configuration_manager, num_input_channels,
                                         cls.num_timesteps)

    def _build_loss(self) -> nn.Module:
        return nn.MSELoss()

    def pretext_loss(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def image_of(self, data: torch.Tensor) -> torch.Tensor:
        """The image channels of nnU-Net's batch (without the coordinate channels)."""
        return data[:, :unwrap(self.network).num_image_channels]

    def _pretext_loss_in_precision(self, batch: dict) -> torch.Tensor:
        data = batch['data'].to(self.device, non_blocking=True)
        with self.precision():
            return self.pretext_loss(data)

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._pretext_loss_in_precision(batch)
        self.backward_and_step(loss)
        return {'loss': loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        return {'loss': self._pretext_loss_in_precision(batch).detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        """nnU-Net's keys, with mean_fg_dice = −loss (no classes): higher is better, as checkpoint_best expects."""
        loss = float(np.mean(self.gather_from_ranks(collate_outputs(val_outputs)['loss'])))
        self.log_validation(-loss, [], loss)

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


class nnUNetTrainerDiffPretrain(PretrainingTrainer):
    """Diffusion pretraining without guidance: predict ε from x_t (T = 10, DDPM's linear β over T steps)."""
    backbone = DIFFUSION
    num_timesteps = 10
    noise_schedule = "ddpm"
    prediction = "epsilon"  # or "x0"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.prediction not in ("epsilon", "x0"):
            raise ValueError(f"{type(self).__name__}.prediction is {self.prediction!r}; use 'epsilon' or 'x0'")
        self.scheduler = DiffusionScheduler(make_alphas_cumprod(self.noise_schedule, self.num_timesteps))

    @property
    def objective(self) -> str:
        return f"MSE between predicted and true {'noise ε' if self.prediction == 'epsilon' else 'clean patch x0'}"

    def pretext_loss(self, data: torch.Tensor) -> torch.Tensor:
        image = self.image_of(data)
        t = torch.randint(0, self.num_timesteps, (data.shape[0],), device=data.device)
        noise = torch.randn_like(image)
        predicted = self.network(data, self.scheduler.add_noise(image, noise, t), t)
        return self.loss(predicted.float(), noise if self.prediction == "epsilon" else image)


class nnUNetTrainerDiffPretrainX0(nnUNetTrainerDiffPretrain):
    """Diffusion pretraining without guidance, predicting the clean patch x0 instead of ε."""
    prediction = "x0"


class nnUNetTrainerDiffPretrainCoord(nnUNetTrainerDiffPretrain):
    """Diffusion pretraining guided by the dataset's anatomical coordinate channels (Li et al.'s BPR guidance)."""
    backbone = DIFFUSION_COORD


class nnUNetTrainerDiffPretrainCoordX0(nnUNetTrainerDiffPretrainCoord):
    """Coordinate-guided diffusion pretraining predicting the clean patch x0 instead of ε."""
    prediction = "x0"


class nnUNetTrainerRestorePretrain(PretrainingTrainer):
    """Restorative baseline (Models Genesis): reconstruct the clean patch from a distorted one, MSE."""
    backbone = RESTORATIVE
    objective = "MSE between restored and clean patch"

    def pretext_loss(self, data: torch.Tensor) -> torch.Tensor:
        image = self.image_of(data)
        restored = self.network(data, genesis_distort(image))
        return self.loss(restored.float(), image)


class nnUNetTrainerRestorePretrainCoord(nnUNetTrainerRestorePretrain):
    """Restorative pretraining with the dataset's coordinate channels (never distorted), as the diffusion one has."""
    backbone = RESTORATIVE_COORD


PRETRAINING_TRAINERS = trainers_defined_in(globals())
__all__ = [cls.__name__ for cls in PRETRAINING_TRAINERS]
