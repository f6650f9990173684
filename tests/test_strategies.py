import pytest
import torch

from nnunet_diffusion.core.masks import MaskCodec
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.strategies import (PlainDiffusion, Recycling, RecyclingNext, SelfConditioning,
                                              SelfConditioningNext)

T = 5


class RecordingDenoiser:
    """Stands in for the network: records every call and returns fixed logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.calls: list[dict] = []

    def __call__(self, x_t, t, condition):
        self.calls.append({"x_t": x_t.clone(), "t": t.clone(), "condition": condition,
                           "grad": torch.is_grad_enabled()})
        return self.logits


def make(strategy_class, T=T):
    return strategy_class(DiffusionScheduler(make_alphas_cumprod("linear", T)), MaskCodec(3))


@pytest.fixture
def x0():
    labels = torch.randint(0, 3, (64, 1, 4, 4, 4))
    return MaskCodec(3).encode(labels)


def test_plain_noises_the_ground_truth_at_every_timestep(x0):
    torch.manual_seed(0)
    denoiser = RecordingDenoiser(torch.zeros(64, 3, 4, 4, 4))
    final = make(PlainDiffusion).final_pass(x0, denoiser)
    assert denoiser.calls == []
    assert set(final.t.tolist()) == set(range(T))
    clean = final.t == 0
    assert torch.corrcoef(torch.stack([final.x_t[clean].flatten(), x0[clean].flatten()]))[0, 1] > 0.99


def test_recycling_first_pass_is_pure_noise_without_gradient_and_second_pass_recycles_it(x0):
    torch.manual_seed(0)
    logits = torch.randn(64, 3, 4, 4, 4)
    denoiser = RecordingDenoiser(logits)
    final = make(Recycling).final_pass(x0, denoiser)
    (first,) = denoiser.calls
    assert not first["grad"]
    assert torch.all(first["t"] == T - 1)
    assert set(final.t.tolist()) == set(range(T - 1))  # never trains the last step: t in {0..T-2}
    x0_hat = MaskCodec(3).decode(logits)
    clean = final.t == 0  # ᾱ_0 ≈ 1: x_0 ≈ the recycled soft prediction, not the ground truth
    assert torch.allclose(final.x_t[clean], x0_hat[clean], atol=0.05)
    assert not torch.allclose(final.x_t[clean], x0[clean], atol=0.5)


def test_recycling_next_predicts_from_the_noised_ground_truth_one_step_later(x0):
    torch.manual_seed(0)
    denoiser = RecordingDenoiser(torch.zeros(64, 3, 4, 4, 4))
    final = make(RecyclingNext).final_pass(x0, denoiser)
    (first,) = denoiser.calls
    assert not first["grad"]
    assert torch.equal(first["t"], final.t + 1)
    assert final.t.max() <= T - 2


def test_self_conditioning_feeds_the_detached_prediction_to_about_half_the_samples(x0):
    torch.manual_seed(0)
    logits = torch.full((64, 3, 4, 4, 4), 4.0)
    logits[:, 0] = -4
    denoiser = RecordingDenoiser(logits)
    final = make(SelfConditioning).final_pass(x0, denoiser)
    (first,) = denoiser.calls
    assert not first["grad"] and first["condition"] is None
    assert torch.equal(first["t"], final.t) and torch.equal(first["x_t"], final.x_t)
    kept = final.self_condition.flatten(1).amax(1) > 0
    assert 16 < int(kept.sum()) < 48
    assert torch.all(final.self_condition[~kept] == 0)
    assert final.self_condition.min() >= 0 and final.self_condition.max() <= 1


def test_self_conditioning_next_runs_the_second_pass_on_the_posterior_of_x_t_plus_one(x0):
    torch.manual_seed(0)
    denoiser = RecordingDenoiser(torch.zeros(64, 3, 4, 4, 4))
    strategy = make(SelfConditioningNext)
    final = strategy.final_pass(x0, denoiser)
    (first,) = denoiser.calls
    assert torch.equal(first["t"], final.t + 1)
    expected = strategy.scheduler.posterior_mean(MaskCodec(3).decode(denoiser.logits), first["x_t"], final.t + 1,
                                                 final.t)
    assert torch.allclose(final.x_t, expected)


@pytest.mark.parametrize("strategy_class", [Recycling, RecyclingNext, SelfConditioningNext])
def test_strategies_using_t_plus_one_need_two_timesteps(strategy_class):
    with pytest.raises(ValueError, match="needs at least 2 diffusion timesteps"):
        make(strategy_class, T=1)
