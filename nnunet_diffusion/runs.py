"""Train one nnU-Net model in this process with a chosen budget: what `nnUNetv2_train` does (nnU-Net's own trainer
lookup, `get_trainer_from_args` and loop), minus its final validation, with epochs and iterations set on the
trainer instead of through a class per budget. Used by the tests and the experiments."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class TrainingBudget:
    """nnU-Net's loop lengths: epochs × iterations per epoch, and validation batches per epoch."""
    epochs: int
    iterations: int
    val_iterations: int = 1

    def __post_init__(self):
        if min(self.epochs, self.iterations, self.val_iterations) < 1:
            raise ValueError(f"epochs, iterations and validation iterations must be at least 1, got {self}")


def train_model(dataset: str, configuration: str, fold: int | str, trainer_name: str, plans: str,
                budget: TrainingBudget, device: str = "cpu", seed: int | None = None,
                validate: bool = False, pretrained_weights: str | Path | None = None):
    """Train from scratch (nnU-Net's `--c` logic is the caller's), starting from `pretrained_weights` as
    `-pretrained_weights` does, and return the trainer; `seed` seeds Python, numpy and torch in this process
    (nnU-Net's augmentation workers draw their own seeds)."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    trainer = get_trainer_from_args(str(dataset), configuration, fold, trainer_name, plans,
                                    device=torch.device(device))
    trainer.num_epochs = budget.epochs
    trainer.num_iterations_per_epoch = budget.iterations
    trainer.num_val_iterations_per_epoch = budget.val_iterations
    maybe_load_checkpoint(trainer, False, False, None if pretrained_weights is None else str(pretrained_weights))
    trainer.run_training()
    if validate:
        trainer.perform_actual_validation(False)
    return trainer


def training_log(checkpoint_file: str | Path) -> dict:
    """nnU-Net's logger values (losses, pseudo-Dice, epoch timestamps) stored in a checkpoint."""
    return torch.load(checkpoint_file, map_location="cpu", weights_only=False)["logging"]


def epoch_seconds(logging: dict) -> list[float]:
    """Wall-clock seconds of every epoch (training and its validation), from nnU-Net's logged timestamps."""
    return [end - start for start, end in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]
