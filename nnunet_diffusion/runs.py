"""Train one nnU-Net model in this process with a chosen budget: what `nnUNetv2_train` does (nnU-Net's own trainer
lookup, `get_trainer_from_args` and loop), minus its final validation, with epochs and iterations set on the
trainer instead of through a class per budget. Used by the tests, the experiments and, as
`python -m nnunet_diffusion.runs`, by `nnunet-diffusion crossval` (one fresh process per training)."""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from nnunet_diffusion.utils import TrainingBudget


def train_model(dataset: str, configuration: str, fold: int | str, trainer_name: str, plans: str,
                budget: TrainingBudget | None, device: str = "cpu", seed: int | None = None,
                validate: bool = False, pretrained_weights: str | Path | None = None):
    """Train from scratch (nnU-Net's `--c` logic is the caller's), starting from `pretrained_weights` as
    `-pretrained_weights` does, and return the trainer; `budget` None keeps the trainer's own; `seed` seeds Python, numpy and torch in this process
    (nnU-Net's augmentation workers draw their own seeds)."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    trainer = get_trainer_from_args(str(dataset), configuration, fold, trainer_name, plans,
                                    device=torch.device(device))
    if budget is not None:
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


def main(argv: list[str] | None = None) -> int:
    """`python -m nnunet_diffusion.runs DATASET CONFIGURATION FOLD TRAINER`: one training, as `nnUNetv2_train` but
    with an optional budget and seed and without the final validation."""
    parser = argparse.ArgumentParser(prog="python -m nnunet_diffusion.runs", description=main.__doc__)
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("fold")
    parser.add_argument("trainer")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-device", "--device", default="cpu")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--budget", type=int, nargs=3, metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"))
    args = parser.parse_args(argv)
    from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value
    os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()  # nnU-Net's lookup finds the plugin's trainers
    train_model(args.dataset, args.configuration, args.fold if args.fold == "all" else int(args.fold), args.trainer,
                args.plans, None if args.budget is None else TrainingBudget(*args.budget), args.device, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
