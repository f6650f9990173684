import pytest
import torch

from nnunet_diffusion.core.schedules import (cosine_alphas_cumprod, linear_alphas_cumprod, make_alphas_cumprod,
                                             resample_alphas_cumprod)


def test_linear_schedule_resampled_to_five_steps_matches_reference_values():
    # ᾱ at indices 0/250/500/750/1000 of the linear 1e-4..0.02 schedule over 1001 steps (Fu et al.)
    expected = torch.tensor([0.99990, 0.52175, 0.07799, 0.003319, 0.00003995], dtype=torch.float64)
    assert torch.allclose(make_alphas_cumprod("linear", 5), expected, rtol=2e-3)


def test_resampling_keeps_first_and_last_values_and_evenly_spaced_indices():
    full = linear_alphas_cumprod()
    resampled = resample_alphas_cumprod(full, 11)
    assert resampled[0] == full[0] and resampled[-1] == full[-1]
    assert resampled[5] == full[500]


@pytest.mark.parametrize("steps", [1, 2, 10, 100, 1000])
@pytest.mark.parametrize("name", ["linear", "ddpm", "cosine"])
def test_schedules_are_valid_for_small_and_large_T(name, steps):
    a = make_alphas_cumprod(name, steps)
    assert a.shape == (steps,)
    assert torch.all((a > 0) & (a < 1))
    assert torch.all(a[1:] < a[:-1])


@pytest.mark.parametrize("steps,last", [(10, 0.905), (100, 0.366), (1000, 4.0e-5)])
def test_ddpm_schedule_lets_T_set_the_largest_noise(steps, last):
    # the linear β 1e-4 … 0.02 over exactly T steps: ᾱ_T ≈ exp(−T · 0.01)
    a = make_alphas_cumprod("ddpm", steps)
    assert a[0] == pytest.approx(1 - 1e-4)
    assert a[-1] == pytest.approx(last, rel=0.02)
    assert make_alphas_cumprod("ddpm", 1)[0] == pytest.approx(1 - 1e-4)


def test_cosine_schedule_ends_near_pure_noise_and_starts_near_clean():
    a = cosine_alphas_cumprod(10)
    assert a[0] > 0.95 and a[-1] < 1e-3


@pytest.mark.parametrize("name,steps,message", [("linear", 0, "at least 1"), ("sqrt", 5, "unknown noise schedule"),
                                                ("linear", 2000, "cannot resample")])
def test_bad_schedule_requests_raise_clear_errors(name, steps, message):
    with pytest.raises(ValueError, match=message):
        make_alphas_cumprod(name, steps)
