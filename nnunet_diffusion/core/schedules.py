"""Noise schedules as cumulative products ᾱ_t, so that training and sampling share one definition.

The reference schedule of Fu et al. ("linear") is a linear β schedule over 1001 steps resampled to T steps by
keeping ᾱ at evenly spaced indices (for T = 5: 0, 250, 500, 750, 1000), so every T ends near pure noise. DDPM's
own schedule ("ddpm") runs the linear β (1e-4 … 0.02) over exactly T steps, so T sets the largest noise
(ᾱ at the last step: 0.90 for T = 10, 0.37 for T = 100, 4e-5 for T = 1000): the meaning of T in the pretraining
timestep ablation. The cosine schedule (Nichol & Dhariwal) is defined directly on T steps.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "ddpm", "cosine")


def linear_alphas_cumprod(num_steps: int = 1001, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ of a linear β schedule, in float64 so that resampling keeps full precision."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def resample_alphas_cumprod(alphas_cumprod: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Keep ᾱ at `num_steps` evenly spaced indices of a finer schedule (first and last index included)."""
    length = alphas_cumprod.shape[0]
    if not 1 <= num_steps <= length:
        raise ValueError(f"cannot resample a {length}-step schedule to {num_steps} steps; use 1..{length}")
    if num_steps == 1:
        return alphas_cumprod[-1:].clone()
    indices = torch.round(torch.linspace(0, length - 1, num_steps, dtype=torch.float64)).long()
    return alphas_cumprod[indices].clone()


def cosine_alphas_cumprod(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ of the cosine schedule on exactly `num_steps` steps, with β clipped to `max_beta`."""
    def f(u: float) -> float:
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)],
                         dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def make_alphas_cumprod(name: str, num_steps: int) -> torch.Tensor:
    """ᾱ_t, t = 0..num_steps-1, for a named schedule (see `SCHEDULES`)."""
    if num_steps < 1:
        raise ValueError(f"a schedule needs at least 1 step, got {num_steps}")
    if name == "linear":
        return resample_alphas_cumprod(linear_alphas_cumprod(), num_steps)
    if name == "ddpm":
        return linear_alphas_cumprod(num_steps)
    if name == "cosine":
        return cosine_alphas_cumprod(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
