"""How the trained pass picks its timestep t: uniform, or loss-aware importance sampling as in ImgX-DiffSeg.

Loss-aware sampling (Nichol & Dhariwal's second-moment resampler, which the recycling reference uses) keeps the
last `history` training losses of every t, draws t with p_t ∝ sqrt(mean(loss²)) once every t has a full history
(uniformly before), and weights each sample's loss by 1 / (p_t · T) so that the expected loss is unchanged.
(ImgX-DiffSeg multiplies by p_t · T instead, which up-weights frequent t; we use the unbiased weight.)
"""
from __future__ import annotations

import torch


class TimestepSampler:
    """Uniform t ∈ [0, high) with weight 1: the default of every strategy."""
    needs_losses = False

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probabilities(self, high: int) -> torch.Tensor:
        return torch.full((high,), 1.0 / high, dtype=torch.float64)

    def sample(self, batch_size: int, high: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One t per sample in [0, high), and the per-sample loss weights (None: all 1)."""
        return torch.randint(0, high, (batch_size,), device=device), None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the per-sample training losses of the timesteps just trained (unused by uniform sampling)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareTimestepSampler(TimestepSampler):
    """p_t ∝ sqrt(E[loss²]) over the last `history` losses of each t, mixed with `uniform_probability`."""
    needs_losses = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_probability: float = 0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_probability = uniform_probability
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self, high: int) -> torch.Tensor:
        if not self.warmed_up:
            return super().probabilities(high)
        weights = (self.losses[:high] ** 2).mean(1).sqrt()
        p = weights / weights.sum()
        return p * (1 - self.uniform_probability) + self.uniform_probability / high

    def sample(self, batch_size, high, device):
        p = self.probabilities(high)
        t = torch.multinomial(p, batch_size, replacement=True)
        weights = 1.0 / (p[t] * high)
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t, losses):
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[step] >= self.history:
                self.losses[step, :-1] = self.losses[step, 1:].clone()
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
            self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"timestep-sampler state of shape {tuple(state['losses'].shape)} does not fit "
                             f"{self.num_timesteps} timesteps × {self.history} losses")
        self.losses = state["losses"].clone().double()
        self.counts = state["counts"].clone().long()


TIMESTEP_SAMPLERS = {"uniform": TimestepSampler, "loss_aware": LossAwareTimestepSampler}


def make_timestep_sampler(name: str, num_timesteps: int) -> TimestepSampler:
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampling {name!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[name](num_timesteps)
