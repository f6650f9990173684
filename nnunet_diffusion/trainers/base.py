"""`PluginTrainer`: what every trainer of the plugin shares on top of nnU-Net's `nnUNetTrainer`."""
from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_diffusion.checkpoints import load_checkpoint
from nnunet_diffusion.trainer_support import ensure_checkpoint_fits, unwrap


class PluginTrainer(nnUNetTrainer):
    """Refuses cascaded configurations, hands deep supervision to the plugin network, checks that a checkpoint fits
    before loading it, keeps the plugin's own state in nnU-Net's checkpoint, and gives trainers with their own
    train/validation steps nnU-Net's precision context, update step and validation gathering."""
    checkpoint_on_cpu = False  # store CPU tensors even when trained on an accelerator
    training_epochs: int | None = None  # None keeps nnU-Net's 1000; fine-tuning and the short schedules set it

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.training_epochs is not None:
            self.num_epochs = self.training_epochs
        if self.is_cascaded:
            raise ValueError(f"{type(self).__name__} does not support cascaded configurations ({configuration} "
                             f"uses the segmentation of {self.configuration_manager.previous_stage_name}); train "
                             f"a full-resolution configuration such as 3d_fullres")

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        unwrap(self.network).set_deep_supervision_enabled(enabled)

    def plugin_checkpoint_state(self) -> dict:
        """Entries the plugin adds to nnU-Net's checkpoint (none by default)."""
        return {}

    def load_plugin_checkpoint_state(self, checkpoint: dict) -> None:
        """Restore what `plugin_checkpoint_state` added (a checkpoint written before may lack it)."""

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, rewritten once on rank 0 when the plugin adds entries or wants CPU tensors (read
        onto the CPU, so that a rewrite never holds a second copy on the accelerator)."""
        super().save_checkpoint(filename)
        extra = self.plugin_checkpoint_state()
        to_cpu = self.checkpoint_on_cpu and self.device.type != 'cpu'
        if (extra or to_cpu) and self.local_rank == 0 and not self.disable_checkpointing:
            checkpoint = load_checkpoint(filename, map_location='cpu')
            torch.save({**checkpoint, **extra}, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's loading, after a check that names the trainer that wrote a checkpoint which does not fit.

        nnU-Net 2.8 loads only from a file name (its dict branch reads an unbound name), so a file is read here
        for the check and the plugin's entries, and once more by nnU-Net."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = load_checkpoint(checkpoint, map_location=self.device)
        ensure_checkpoint_fits(self, checkpoint, f"checkpoint {filename_or_checkpoint}"
                               if isinstance(filename_or_checkpoint, str) else "the checkpoint")
        super().load_checkpoint(filename_or_checkpoint)
        self.load_plugin_checkpoint_state(checkpoint)

    def precision(self) -> AbstractContextManager:
        """nnU-Net's mixed precision: autocast on CUDA, full precision elsewhere."""
        return autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's update (gradient scaling on CUDA, clipping at norm 12); a non-finite loss is refused."""
        iteration = self._iteration_in_epoch()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, iteration {iteration}/"
                f"{self.num_iterations_per_epoch}: the weights are not "
                f"updated with it. Likely causes: a learning rate too high for this plan, NaN/inf voxels in the "
                f"preprocessed images (check the raw images), or an fp16 overflow on GPU; resume from the last "
                f"checkpoint with --c after fixing the cause")
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()

    def _iteration_in_epoch(self) -> int:
        """1-based index of this optimiser step within the current epoch (nnU-Net's loop keeps no such counter):
        keyed by epoch, so it restarts at every epoch, also after a resume."""
        epoch, count = getattr(self, "_plugin_iteration", (None, 0))
        count = count + 1 if epoch == self.current_epoch else 1
        self._plugin_iteration = (self.current_epoch, count)
        return count

    def gather_from_ranks(self, values: np.ndarray) -> np.ndarray:
        """Validation values of every DDP rank, stacked along the first axis (this rank's alone without DDP)."""
        if not self.is_ddp:
            return values
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values)
        return np.concatenate([np.atleast_1d(v) for v in gathered])

    def log_validation(self, score: float, per_class: list[float], loss: float) -> None:
        """nnU-Net's three validation keys (its logger takes no others): `score` goes where nnU-Net expects the
        mean foreground Dice, so its EMA, checkpoint_best and progress.png follow it (higher is better)."""
        self.logger.log('mean_fg_dice', score, self.current_epoch)
        self.logger.log('dice_per_class_or_region', per_class, self.current_epoch)
        self.logger.log('val_losses', loss, self.current_epoch)
