"""Fine-tuning of pretraining checkpoints: the warm-up + poly learning rate per epoch, the whole pretrained network
loaded but its output layers, and the random-init control identical but for the weights."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

from nnunet_diffusion.pretraining.lr_schedule import WarmupPolyLRScheduler
from nnunet_diffusion.trainers.pretraining import PRETRAINING_TRAINERS
from nnunet_diffusion.trainers.probes import PROBE_TRAINERS, PretrainedFinetuneTrainer, RandomInit

TRAINERS_BY_NAME = {cls.__name__: cls for cls in PRETRAINING_TRAINERS + PROBE_TRAINERS}
FINETUNE_TRAINERS = [cls for cls in PROBE_TRAINERS
                     if issubclass(cls, PretrainedFinetuneTrainer) and not issubclass(cls, RandomInit)]
NUM_CLASSES = 3


def _lr_per_epoch(trainer_class: type, num_epochs: int) -> list[float]:
    """The learning rate of each epoch as nnU-Net's loop sets it: `lr_scheduler.step(current_epoch)` at every epoch
    start, on the optimiser and scheduler the trainer's `configure_optimizers` returns."""
    trainer = SimpleNamespace(network=torch.nn.Linear(2, 2), initial_lr=trainer_class.learning_rate,
                              weight_decay=3e-5, num_epochs=num_epochs, warmup_fraction=trainer_class.warmup_fraction)
    optimizer, scheduler = trainer_class.configure_optimizers(trainer)
    rates = []
    for epoch in range(num_epochs):
        scheduler.step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def _nnunet_warmup_then_poly(initial_lr: float, num_epochs: int, warmup: int) -> list[float]:
    """nnU-Net's own two-stage schedule (nnUNetTrainer_warmup, PretrainedTrainer): Lin_incr_LRScheduler for the
    warm-up epochs, PolyLRScheduler_offset after them."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), initial_lr)
    warming, poly = (Lin_incr_LRScheduler(optimizer, initial_lr, warmup),
                     PolyLRScheduler_offset(optimizer, initial_lr, num_epochs, warmup))
    rates = []
    for epoch in range(num_epochs):
        (warming if epoch < warmup else poly).step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_the_learning_rate_warms_up_linearly_over_5_percent_then_follows_nnunets_poly_schedule():
    rates = _lr_per_epoch(FINETUNE_TRAINERS[0], 1000)
    assert rates == pytest.approx(_nnunet_warmup_then_poly(1e-3, 1000, 50), rel=1e-12)
    assert rates[:50] == pytest.approx([1e-3 * (epoch + 1) / 50 for epoch in range(50)])  # linear, 2e-5 → 1e-3
    assert rates[50] == pytest.approx(1e-3)
    assert rates[50:] == sorted(rates[50:], reverse=True) and 0 < rates[-1] < 1e-4
    assert _lr_per_epoch(FINETUNE_TRAINERS[0], 10)[0] == pytest.approx(1e-3)  # at least one warm-up epoch


def test_a_resumed_run_gets_the_rate_of_its_epoch():
    """nnU-Net's --c restores current_epoch and steps a freshly built scheduler with it."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 1.0)
    uninterrupted = WarmupPolyLRScheduler(optimizer, 1e-3, 100, 5)
    rates = []
    for epoch in range(100):
        uninterrupted.step(epoch)
        rates.append(uninterrupted.get_last_lr()[0])
    for epoch in (3, 5, 60):  # a scheduler built afresh, as after --c, then stepped by on_train_epoch_start
        fresh = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 1.0)
        WarmupPolyLRScheduler(fresh, 1e-3, 100, 5).step(epoch)
        assert fresh.param_groups[0]["lr"] == rates[epoch]
    assert rates[4] == pytest.approx(1e-3) and rates[3] < rates[4] and rates[60] < rates[5]
    with pytest.raises(ValueError, match="between 1 and 100 epochs"):
        WarmupPolyLRScheduler(optimizer, 1e-3, 100, 0)


def _pretrained_checkpoint(trainer_class: type, plans, channels: int, path: Path) -> tuple[Path, dict]:
    """A pretraining checkpoint in nnU-Net's format whose parameters are all moved away from any initialisation
    (FiLM starts at zero), so that a tensor equal to it after loading can only have been loaded."""
    network = TRAINERS_BY_NAME[trainer_class.backbone.pretraining_trainer].build_network_architecture(
        *plans, channels, 1, False)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter))
    weights = network.state_dict()
    torch.save({"network_weights": weights, "trainer_name": trainer_class.backbone.pretraining_trainer}, path)
    return path, weights


@pytest.mark.parametrize("trainer_class", FINETUNE_TRAINERS, ids=lambda c: c.__name__)
def test_fine_tuning_starts_from_every_pretrained_tensor_but_the_output_layers(trainer_class, preprocessed_plans,
                                                                               tmp_path):
    channels = 4 if trainer_class.backbone.coordinates else 1
    path, pretrained = _pretrained_checkpoint(trainer_class, preprocessed_plans, channels, tmp_path / "p.pth")
    network = trainer_class.build_network_architecture(*preprocessed_plans, channels, NUM_CLASSES, True)
    random_start = {k: v.clone() for k, v in network.state_dict().items()}
    load_pretrained_weights(network, str(path))
    loaded = network.state_dict()
    assert loaded.keys() == pretrained.keys()
    output_layers = {k for k in loaded if k.startswith("unet.decoder.seg_layers.")}
    assert {k for k in loaded if not torch.equal(loaded[k], pretrained[k])} == output_layers
    assert all(torch.equal(loaded[k], random_start[k]) for k in output_layers)
    assert all(loaded[k].shape[0] == NUM_CLASSES for k in output_layers)
    assert bool(network.holds_pretrained_weights)
    image = torch.randn(2, channels, *preprocessed_plans[1].patch_size)
    outputs = network(image)  # deep supervision: one output per decoder stage, finest first
    assert len(outputs) == len(network.unet.decoder.stages)
    assert outputs[0].shape == (2, NUM_CLASSES, *preprocessed_plans[1].patch_size) and torch.isfinite(outputs[0]).all()
    network.set_deep_supervision_enabled(False)  # as the predictor builds it
    assert torch.equal(network(image), outputs[0])


@pytest.mark.parametrize("trainer_class", FINETUNE_TRAINERS, ids=lambda c: c.__name__)
def test_the_random_init_control_is_the_same_network_and_schedule_without_the_weights(trainer_class,
                                                                                     preprocessed_plans):
    control = TRAINERS_BY_NAME[trainer_class.__name__.replace("PretrainedFinetune", "PretrainedFinetuneRandomInit")]
    assert control.backbone == trainer_class.backbone
    channels = 4 if trainer_class.backbone.coordinates else 1
    torch.manual_seed(0)
    finetuned = trainer_class.build_network_architecture(*preprocessed_plans, channels, NUM_CLASSES, True)
    torch.manual_seed(0)
    random_init = control.build_network_architecture(*preprocessed_plans, channels, NUM_CLASSES, True)
    assert {k: v.shape for k, v in random_init.state_dict().items()} == \
        {k: v.shape for k, v in finetuned.state_dict().items()}
    assert all(torch.equal(v, finetuned.state_dict()[k]) for k, v in random_init.state_dict().items())
    assert not bool(random_init.holds_pretrained_weights)
    assert _lr_per_epoch(control, 1000) == _lr_per_epoch(trainer_class, 1000)
