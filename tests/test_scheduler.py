import pytest
import torch

from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.core.scheduler import DiffusionScheduler

SHAPES = [(2, 3, 6, 5), (2, 3, 4, 6, 5)]  # 2D and 3D batches


@pytest.fixture
def scheduler():
    return DiffusionScheduler(make_alphas_cumprod("linear", 5))


@pytest.mark.parametrize("shape", SHAPES)
def test_add_noise_golden_values(scheduler, shape):
    x0 = torch.ones(shape)
    noise = torch.full(shape, -1.0)
    t = torch.tensor([0, 3])
    x_t = scheduler.add_noise(x0, noise, t)
    # sqrt(ᾱ)·1 − sqrt(1−ᾱ): ᾱ_0 = 0.9999, ᾱ_3 = 0.0033189
    assert torch.allclose(x_t[0], torch.tensor(0.99995 - 0.0100), atol=1e-4)
    assert torch.allclose(x_t[1], torch.tensor(0.057610 - 0.998339), atol=1e-4)


@pytest.mark.parametrize("steps,expected", [(5, [4, 3, 2, 1, 0]), (3, [4, 2, 0]), (2, [4, 0]), (1, [4])])
def test_set_timesteps_spreads_steps_from_pure_noise_to_zero(scheduler, steps, expected):
    assert scheduler.set_timesteps(steps).tolist() == expected


@pytest.mark.parametrize("steps", [0, 6, 2.5])
def test_set_timesteps_rejects_counts_outside_the_schedule(scheduler, steps):
    with pytest.raises(ValueError, match="integer in 1..5"):
        scheduler.set_timesteps(steps)


@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_step_is_consistent_with_the_forward_process(scheduler, shape):
    """With the true x0, a DDIM (η = 0) step from q(x_t) lands exactly on q(x_prev) with the same noise."""
    torch.manual_seed(0)
    x0, eps = torch.rand(shape) * 2 - 1, torch.randn(shape)
    scheduler.set_timesteps(3)  # 4 -> 2 -> 0
    x4 = scheduler.add_noise(x0, eps, torch.tensor([4, 4]))
    x2 = scheduler.step(x0, 4, x4, "ddim").prev_sample
    assert torch.allclose(x2, scheduler.add_noise(x0, eps, torch.tensor([2, 2])), atol=1e-5)


def test_last_step_returns_the_x0_estimate(scheduler):
    scheduler.set_timesteps(5)
    x0 = torch.rand(1, 2, 4, 4)
    assert torch.equal(scheduler.step(x0, 0, torch.randn(1, 2, 4, 4), "ddpm").prev_sample, x0)


@pytest.mark.parametrize("shape", SHAPES)
def test_ddpm_step_samples_the_posterior(scheduler, shape):
    """DDPM (η = 1) draws from q(x_{t-1} | x_t, x0): the mean matches the posterior mean, the variance β̃."""
    scheduler.set_timesteps(5)
    x0 = torch.rand(shape[1:]).expand(4000, *shape[1:]) * 2 - 1
    x_t = torch.randn(shape[1:]).expand_as(x0)
    generator = torch.Generator().manual_seed(1)
    prev = scheduler.step(x0, 2, x_t, "ddpm", generator).prev_sample
    t, t_prev = torch.full((4000,), 2), torch.full((4000,), 1)
    mean = scheduler.posterior_mean(x0, x_t, t, t_prev)
    a_t, a_prev = scheduler.alphas_cumprod[2], scheduler.alphas_cumprod[1]
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    assert torch.allclose(prev.mean(0), mean[0], atol=4 * variance.sqrt() / 4000 ** 0.5)
    assert torch.allclose(prev.var(0).mean(), variance, rtol=0.05)


def test_ddpm_draws_are_reproducible_with_a_generator(scheduler):
    scheduler.set_timesteps(5)
    x0, x_t = torch.zeros(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    first = scheduler.step(x0, 3, x_t, "ddpm", torch.Generator().manual_seed(7)).prev_sample
    second = scheduler.step(x0, 3, x_t, "ddpm", torch.Generator().manual_seed(7)).prev_sample
    assert torch.equal(first, second)


def test_unknown_sampler_is_rejected(scheduler):
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        scheduler.step(torch.zeros(1, 1, 2, 2), 4, torch.zeros(1, 1, 2, 2), "euler")
