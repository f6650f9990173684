"""Sampler settings chosen at prediction time, without retraining, through environment variables.

Every model carries its default sampling in its checkpoint (the trainer's `default_sampling_steps`,
`default_sampler`, `default_early_exit`). nnU-Net's predictor only calls `network(x)`, so, like `nnUNet_compile`,
overrides travel as documented environment variables, read (and validated) at every sampling call; code that
drives the predictor in its own process passes a `SamplerSettings` instead
(`DiffusionSegmentationNetwork.sampling_with`):

- `nnUNet_diffusion_sampler`: `ddim` (η = 0) or `ddpm` (default: the model's, DDIM for every trainer)
- `nnUNet_diffusion_steps`: number of sampling steps K, 1..T (default: the model's; T, the training timesteps,
  for models trained from scratch, 1 for recycling fine-tuned from a stock model)
- `nnUNet_diffusion_seed`: integer; every network call then starts from the same seeded noise, so predictions
  are reproducible and independent of tile and case order (unset: fresh noise per call)
- `nnUNet_diffusion_early_exit`: tolerance in [0, 1]; stop once at most this fraction of voxels changes its
  label between two consecutive x0 estimates (0: none changes; `off`: always run K steps; unset: the model's,
  which for every trainer is to run all K steps)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nnunet_diffusion.core.scheduler import SAMPLERS

ENV_SAMPLER = "nnUNet_diffusion_sampler"
ENV_STEPS = "nnUNet_diffusion_steps"
ENV_SEED = "nnUNet_diffusion_seed"
ENV_EARLY_EXIT = "nnUNet_diffusion_early_exit"


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str
    steps: int
    seed: int | None = None
    early_exit_tolerance: float | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; set {ENV_SAMPLER} to one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"{ENV_STEPS} must be at least 1, got {self.steps}")
        if self.early_exit_tolerance is not None and not 0 <= self.early_exit_tolerance <= 1:
            raise ValueError(f"{ENV_EARLY_EXIT} must be a number in [0, 1], got {self.early_exit_tolerance}")

    def checked_for(self, num_timesteps: int) -> "SamplerSettings":
        """These settings, after checking that a model trained with `num_timesteps` steps can run them."""
        if self.steps > num_timesteps:
            raise ValueError(f"{ENV_STEPS}={self.steps} exceeds the {num_timesteps} timesteps this model was "
                             f"trained with; use a value in 1..{num_timesteps}")
        return self

    @classmethod
    def from_environment(cls, num_timesteps: int, default: "SamplerSettings | None" = None) -> "SamplerSettings":
        """Read and validate the nnUNet_diffusion_* variables for a model trained with `num_timesteps` steps; what
        is unset comes from `default` (the model's; without one DDIM over all T steps)."""
        default = default or cls("ddim", num_timesteps)
        sampler = os.environ.get(ENV_SAMPLER, "").strip().lower() or default.sampler
        steps = _parse(ENV_STEPS, int, default.steps)
        seed = _parse(ENV_SEED, int, default.seed)
        tolerance = None if os.environ.get(ENV_EARLY_EXIT, "").strip().lower() == "off" else \
            _parse(ENV_EARLY_EXIT, float, default.early_exit_tolerance)
        return cls(sampler=sampler, steps=steps, seed=seed, early_exit_tolerance=tolerance).checked_for(num_timesteps)


def check_environment(num_timesteps: int) -> SamplerSettings:
    """Validate the nnUNet_diffusion_* variables when a network is built (before nnU-Net preprocesses or writes
    anything), stopping with the one-line message instead of failing at the first tile."""
    try:
        return SamplerSettings.from_environment(num_timesteps)
    except ValueError as error:
        raise SystemExit(f"nnunet-diffusion: {error}") from None


def _parse(name: str, kind: type, default: int | float | None):
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}; unset it or give e.g. "
                         f"{name}={'5' if kind is int else '0.01'}") from None
