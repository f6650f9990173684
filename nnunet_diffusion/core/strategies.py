"""Training strategies of Fu et al.: how the inputs of the trained (last) forward pass are made.

Each strategy receives the clean mask x0 and a `denoise(x_t, t, self_condition)` callable (the trainer passes
one that goes through `self.network`, so DDP sees every forward). Earlier passes run under `torch.no_grad()`;
the loss is always computed by the caller on the last pass only.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from nnunet_diffusion.core.masks import MaskCodec, noisy_mask_to_input
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.timesteps import TimestepSampler

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class FinalPass:
    """Inputs of the trained forward pass."""
    x_t: torch.Tensor
    t: torch.Tensor
    self_condition: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # per-sample loss weights of importance-sampled t (None: all 1)


class TrainingStrategy(ABC):
    needs_self_condition_channels = False
    min_timesteps = 1

    def __init__(self, scheduler: DiffusionScheduler, codec: MaskCodec,
                 timestep_sampler: TimestepSampler | None = None):
        if scheduler.num_train_timesteps < self.min_timesteps:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_timesteps} diffusion timesteps, the "
                             f"schedule has {scheduler.num_train_timesteps}; raise num_timesteps")
        self.scheduler = scheduler
        self.codec = codec
        self.timestep_sampler = timestep_sampler or TimestepSampler(scheduler.num_train_timesteps)

    @property
    def T(self) -> int:
        return self.scheduler.num_train_timesteps

    def _timesteps(self, x0: torch.Tensor, high: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One timestep per sample in [0, high) from the timestep sampler, with its loss weights."""
        return self.timestep_sampler.sample(x0.shape[0], high, x0.device)

    def _noised(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, torch.randn_like(x0), t)

    def _predict_x0(self, denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A first pass without gradient, returning the soft x̂0 = 2·p − 1 (never argmax)."""
        with torch.no_grad():
            logits = denoise(x_t, t, None)
        return self.codec.decode(logits).detach()

    @abstractmethod
    def final_pass(self, x0: torch.Tensor, denoise: Denoiser) -> FinalPass:
        """Inputs of the trained pass for a batch whose clean mask is x0 (B, C, *spatial) in [−1, 1]."""


class PlainDiffusion(TrainingStrategy):
    """'Diff.': noise the ground truth at a random t and predict x0."""

    def final_pass(self, x0, denoise):
        t, weight = self._timesteps(x0, self.T)
        return FinalPass(self._noised(x0, t), t, weight=weight)


class SelfConditioning(TrainingStrategy):
    """'Diff. sc. x_t' (Chen et al.): a first pass at the same x_t; its x̂0 conditions the second pass with
    probability 0.5 per sample (zeros otherwise). At sampling time the previous step's x̂0 is fed."""
    needs_self_condition_channels = True
    probability = 0.5

    def _condition(self, x0_hat: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x0_hat.shape[0], device=x0_hat.device) < self.probability
        return noisy_mask_to_input(x0_hat) * keep.reshape(-1, *([1] * (x0_hat.ndim - 1)))

    def final_pass(self, x0, denoise):
        t, weight = self._timesteps(x0, self.T)
        x_t = self._noised(x0, t)
        return FinalPass(x_t, t, self._condition(self._predict_x0(denoise, x_t, t)), weight)


class SelfConditioningNext(SelfConditioning):
    """'Diff. sc. x_{t+1}' (Watson et al.): the first pass runs at t+1 on the noised ground truth; the second
    pass at t gets the sampler's next input, the posterior mean q(x_t | x_{t+1}, x̂0), and x̂0 as condition.
    (ImgX-DiffSeg feeds x_{t+1} told it is t; we feed the x_t a sampler would produce: see docs/trainers.md.)"""
    min_timesteps = 2

    def final_pass(self, x0, denoise):
        t, weight = self._timesteps(x0, self.T - 1)
        x_next = self._noised(x0, t + 1)
        x0_hat = self._predict_x0(denoise, x_next, t + 1)
        x_t = self.scheduler.posterior_mean(x0_hat, x_next, t + 1, t)
        return FinalPass(x_t, t, self._condition(x0_hat), weight)


class RecyclingNext(TrainingStrategy):
    """'Diff. rec. x_{t+1}': predict x̂0 from the noised ground truth at t+1, re-noise it at t with fresh noise
    and train on that instead of the noised ground truth."""
    min_timesteps = 2

    def final_pass(self, x0, denoise):
        t, weight = self._timesteps(x0, self.T - 1)
        x0_hat = self._predict_x0(denoise, self._noised(x0, t + 1), t + 1)
        return FinalPass(self._noised(x0_hat, t), t, weight=weight)


class Recycling(TrainingStrategy):
    """'Diff. rec. x_T' (the proposed method): predict x̂0 from pure noise (t = T−1), re-noise it at
    t ∈ {0, …, T−2} with fresh noise and train on that, as sampling will see its own predictions."""
    min_timesteps = 2

    def trained_timesteps(self) -> int:
        """The trained pass draws t from [0, this): T−1 as in the reference, which never trains t = T−1."""
        return self.T - 1

    def final_pass(self, x0, denoise):
        t_max = torch.full((x0.shape[0],), self.T - 1, device=x0.device, dtype=torch.long)
        x0_hat = self._predict_x0(denoise, self._noised(x0, t_max), t_max)
        t, weight = self._timesteps(x0, self.trained_timesteps())
        return FinalPass(self._noised(x0_hat, t), t, weight=weight)


class RecyclingAllSteps(Recycling):
    """Recycling whose trained pass also covers t = T−1, the timestep sampling starts from: the reference trains
    that response only through the first (no-gradient) pass, so with real time conditioning it can stay untrained."""

    def trained_timesteps(self) -> int:
        return self.T
