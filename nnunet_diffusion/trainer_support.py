"""Helpers of the plugin's trainers that need no trainer base: unwrapping DDP/compile, checkpoint checks, the
per-timestep loss log."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch._dynamo import OptimizedModule

from nnunet_diffusion.core.diffusion_network import is_default_sampling_key


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind nnU-Net's optional DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def mismatching_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], limit: int = 5) -> list[str]:
    """Human-readable list of the first keys that are missing, unexpected or of another shape (a diffusion
    network's default sampling may be missing: checkpoints written before it existed load with all T steps)."""
    found = {k[7:] if k.startswith("module.") and k not in expected else k: v for k, v in found.items()}
    problems = [f"missing {k}" for k in expected
                if k not in found and not is_default_sampling_key(k)]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: shape {tuple(found[k].shape)} != expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in found and isinstance(v, torch.Tensor)
                 and isinstance(found[k], torch.Tensor) and found[k].shape != v.shape]  # not a module's extra state
    return problems[:limit]


def ensure_checkpoint_fits(trainer, checkpoint: dict, source: str) -> None:
    """Raise a clear error when a checkpoint was written by a trainer whose network differs from this one's."""
    problems = mismatching_keys(unwrap(trainer.network).state_dict(), checkpoint["network_weights"])
    if problems:
        written_by = checkpoint.get("trainer_name", "an unknown trainer")
        fix = ("It was trained with other plans or configuration, or by another version of the plugin: use the "
               "plans it was trained with, or train again" if written_by == type(trainer).__name__
               else f"Use the trainer that wrote it: -tr {written_by}")
        raise RuntimeError(f"{source} was written by {written_by} and does not fit {type(trainer).__name__} "
                           f"(first mismatches: {'; '.join(problems)}). {fix}")


class TimestepLossLog:
    """Training loss per diffusion timestep, one entry per epoch, kept as `loss_per_timestep.json` beside
    nnU-Net's progress.png (nnU-Net's logger takes only its own keys). The trainers log each sample's x0
    cross-entropy at full resolution (one vectorised call, unlike nnU-Net's batch Dice). Entries of epochs at or
    after the current one are dropped on write, so a resumed training continues the file."""
    file_name = "loss_per_timestep.json"

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.reset()

    def reset(self) -> None:
        self.sums = [0.0] * self.num_timesteps
        self.counts = [0] * self.num_timesteps

    def add(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for step, loss in zip(t.tolist(), losses.detach().float().cpu().tolist()):
            self.sums[step] += loss
            self.counts[step] += 1

    def write(self, folder: str | Path, epoch: int) -> Path:
        path = Path(folder) / self.file_name
        previous = json.loads(path.read_text())["epochs"] if path.is_file() else []
        entry = {"epoch": epoch, "samples": self.counts,
                 "loss": [s / c if c else None for s, c in zip(self.sums, self.counts)]}
        epochs = [e for e in previous if e["epoch"] < epoch] + [entry]
        path.write_text(json.dumps({"num_timesteps": self.num_timesteps, "epochs": epochs}, indent=1))
        self.reset()
        return path
