"""A small scheduler in the spirit of diffusers/MONAI (`add_noise`, `set_timesteps`, `step`) for x0-predicting models.

Sampling always runs on a subset of the training timesteps, so the network sees exactly the noise levels it
was trained on. DDIM with η = 0 is deterministic; DDPM is DDIM with η = 1, i.e. a draw from the posterior
q(x_prev | x_t, x̂0), which for consecutive steps is exactly the DDPM posterior.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLERS = ("ddim", "ddpm")


@dataclass
class StepOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a schedule value per sample and shape it to broadcast against `like` (B, C, *spatial)."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class DiffusionScheduler:
    def __init__(self, alphas_cumprod: torch.Tensor):
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 1:
            raise ValueError("alphas_cumprod must be a non-empty 1D tensor")
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.num_train_timesteps = alphas_cumprod.numel()
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, with one t per sample."""
        a = _per_sample(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Choose `num_inference_steps` evenly spaced training timesteps, from T−1 (pure noise) down to 0."""
        T = self.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"number of sampling steps must be an integer in 1..{T} (the model was trained with "
                             f"T = {T} timesteps), got {num_inference_steps!r}")
        if num_inference_steps == 1:
            self.timesteps = torch.tensor([T - 1])
        else:
            self.timesteps = torch.round(torch.linspace(T - 1, 0, num_inference_steps, dtype=torch.float64)).long()
        return self.timesteps

    def previous_timestep(self, t: int) -> int | None:
        """The timestep after `t` in the current sampling sequence, or None when `t` is the last."""
        positions = (self.timesteps == t).nonzero()
        if positions.numel() == 0:
            raise ValueError(f"timestep {t} is not in the sampling sequence {self.timesteps.tolist()}")
        index = int(positions[0, 0]) + 1
        return int(self.timesteps[index]) if index < len(self.timesteps) else None

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, sampler: str = "ddim",
             generator: torch.Generator | None = None) -> StepOutput:
        """One reverse step from x_t (`sample`) given the model's x0 estimate (`model_output`)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        x0 = model_output
        prev_t = self.previous_timestep(timestep)
        if prev_t is None:
            return StepOutput(prev_sample=x0, pred_original_sample=x0)
        a_t = self.alphas_cumprod[timestep].item()
        a_prev = self.alphas_cumprod[prev_t].item()
        eps = (sample - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        eta = 0.0 if sampler == "ddim" else 1.0
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma = eta * max(variance, 0.0) ** 0.5
        prev = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = prev + sigma * noise
        return StepOutput(prev_sample=prev, pred_original_sample=x0)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t_prev} | x_t, x0) per sample: where the sampler would go from x_t without noise."""
        a_t = _per_sample(self.alphas_cumprod, t, x0)
        a_prev = _per_sample(self.alphas_cumprod, t_prev, x0)
        coef_x0 = a_prev.sqrt() * (1 - a_t / a_prev) / (1 - a_t)
        coef_xt = (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)
        return coef_x0 * x0 + coef_xt * x_t
