"""Timestep sampling of the trained pass: uniform, and the reference's loss-aware importance sampling."""
import pytest
import torch

from nnunet_diffusion.core.masks import MaskCodec
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.strategies import Recycling, RecyclingAllSteps
from nnunet_diffusion.core.timesteps import LossAwareTimestepSampler, TimestepSampler, make_timestep_sampler
from nnunet_diffusion.trainer_support import TimestepLossLog

T = 5


def warmed_up(losses=(1.0, 2.0, 3.0, 4.0, 10.0), history=3) -> LossAwareTimestepSampler:
    sampler = LossAwareTimestepSampler(T, history=history, uniform_probability=0.0)
    for _ in range(history):
        sampler.update(torch.arange(T), torch.tensor(losses))
    return sampler


def test_uniform_sampling_has_no_weights_and_covers_the_range():
    torch.manual_seed(0)
    t, weights = TimestepSampler(T).sample(4000, T - 1, torch.device("cpu"))
    assert weights is None
    assert set(t.tolist()) == set(range(T - 1))


def test_loss_aware_sampling_is_uniform_until_every_timestep_has_a_full_history():
    sampler = LossAwareTimestepSampler(T, history=2)
    sampler.update(torch.tensor([0, 1, 2, 3]), torch.ones(4) * 5)
    sampler.update(torch.tensor([0, 1, 2, 3]), torch.ones(4) * 5)
    assert not sampler.warmed_up  # t = 4 has no loss yet
    assert torch.allclose(sampler.probabilities(T), torch.full((T,), 0.2, dtype=torch.float64))
    sampler.update(torch.tensor([4, 4]), torch.ones(2))
    assert sampler.warmed_up
    assert not torch.allclose(sampler.probabilities(T), torch.full((T,), 0.2, dtype=torch.float64))


def test_loss_aware_probabilities_follow_the_root_mean_square_loss_and_keep_the_loss_unbiased():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64)
    sampler = warmed_up(tuple(losses.tolist()))
    p = sampler.probabilities(T)
    assert torch.allclose(p, losses / losses.sum())
    torch.manual_seed(0)
    t, weights = sampler.sample(20000, T, torch.device("cpu"))
    assert torch.allclose(weights.double(), 1 / (p[t] * T), rtol=1e-6)
    # E_p[w · L] equals the uniform mean loss: exactly, and by Monte Carlo
    assert torch.isclose((p * (1 / (p * T)) * losses).sum(), losses.mean())
    assert abs(float((weights.double() * losses[t]).mean()) - float(losses.mean())) < 0.1
    assert (t == 4).float().mean() > 0.45  # the hardest timestep is drawn most


def test_loss_aware_sampling_below_the_top_timestep_renormalises():
    sampler = warmed_up()
    p = sampler.probabilities(T - 1)  # recycling trains t in [0, T-1)
    assert p.shape == (T - 1,) and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    t, _ = sampler.sample(1000, T - 1, torch.device("cpu"))
    assert t.max() < T - 1


def test_loss_history_keeps_the_latest_values_and_round_trips_through_a_state_dict():
    sampler = warmed_up(history=2)
    sampler.update(torch.tensor([0]), torch.tensor([7.0]))
    assert sampler.losses[0].tolist() == [1.0, 7.0]
    restored = LossAwareTimestepSampler(T, history=2)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.losses, sampler.losses) and torch.equal(restored.counts, sampler.counts)
    with pytest.raises(ValueError, match="does not fit"):
        LossAwareTimestepSampler(T + 1, history=2).load_state_dict(sampler.state_dict())


def test_unknown_timestep_sampling_names_the_choices():
    with pytest.raises(ValueError, match="uniform, loss_aware"):
        make_timestep_sampler("importance", T)


@pytest.mark.parametrize("strategy_class, top", [(Recycling, T - 2), (RecyclingAllSteps, T - 1)])
def test_recycling_trains_t_up_to_its_limit(strategy_class, top):
    torch.manual_seed(0)
    strategy = strategy_class(DiffusionScheduler(make_alphas_cumprod("linear", T)), MaskCodec(2))
    x0 = MaskCodec(2).encode(torch.randint(0, 2, (256, 1, 2, 2)))
    final = strategy.final_pass(x0, lambda x_t, t, condition: torch.zeros(256, 2, 2, 2))
    assert int(final.t.max()) == top and int(final.t.min()) == 0
    assert final.weight is None


def test_strategies_pass_the_importance_weights_on():
    strategy = Recycling(DiffusionScheduler(make_alphas_cumprod("linear", T)), MaskCodec(2), warmed_up())
    x0 = MaskCodec(2).encode(torch.randint(0, 2, (64, 1, 2, 2)))
    final = strategy.final_pass(x0, lambda x_t, t, condition: torch.zeros(64, 2, 2, 2))
    p = strategy.timestep_sampler.probabilities(T - 1)
    assert torch.allclose(final.weight.double(), 1 / (p[final.t] * (T - 1)), rtol=1e-6)


def test_timestep_loss_log_averages_per_t_and_a_resumed_run_replaces_later_epochs(tmp_path):
    log = TimestepLossLog(3)
    log.add(torch.tensor([0, 0, 2]), torch.tensor([1.0, 3.0, 5.0]))
    log.write(tmp_path, epoch=0)
    log.add(torch.tensor([1]), torch.tensor([4.0]))
    log.write(tmp_path, epoch=1)
    log.add(torch.tensor([1]), torch.tensor([6.0]))
    path = log.write(tmp_path, epoch=1)  # as after --c from the checkpoint of epoch 1
    import json
    written = json.loads(path.read_text())
    assert written["num_timesteps"] == 3
    assert written["epochs"] == [{"epoch": 0, "samples": [2, 0, 1], "loss": [2.0, None, 5.0]},
                                 {"epoch": 1, "samples": [0, 1, 0], "loss": [None, 6.0, None]}]
