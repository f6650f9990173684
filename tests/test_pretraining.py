"""Pretraining trainers: Models Genesis distortions, BPR guidance checks, and short runs through nnU-Net's loop."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_diffusion.bpr.model import BPRConfig, build_bpr
from nnunet_diffusion.pretraining import bpr_guidance
from nnunet_diffusion.pretraining.bpr_guidance import BPR_CHECKPOINT_VARIABLE, EmbeddedBPR, bpr_plans_mismatches
from nnunet_diffusion.pretraining.network import DIFFUSION, DIFFUSION_BPR, RESTORATIVE
from nnunet_diffusion.pretraining.restoration import (bezier_curve, genesis_distort, inpaint, local_shuffle,
                                                      nonlinear_intensity, outpaint)
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.trainers.pretraining import (PRETRAINING_TRAINERS, TIMESTEP_VARIANTS, nnUNetTrainerDiffPretrain,
                                                   nnUNetTrainerDiffPretrainBPR, nnUNetTrainerDiffPretrainBPRX0,
                                                   nnUNetTrainerDiffPretrainX0)
from nnunet_diffusion.trainers.probes import PROBE_TRAINERS
from nnunet_runs import CONFIGURATION, PLANS, predict, train_in_process

TRAINER_NAMES = [cls.__name__ for cls in PRETRAINING_TRAINERS + PROBE_TRAINERS]


# --- naming and signatures ------------------------------------------------------------------------------------------

def test_names_are_safe_and_every_backbone_has_its_probe_trainers():
    assert all("__" not in name for name in TRAINER_NAMES)
    assert len(set(TRAINER_NAMES)) == len(TRAINER_NAMES)
    for spec in (DIFFUSION, DIFFUSION_BPR, RESTORATIVE):
        assert spec.pretraining_trainer in TRAINER_NAMES
        assert set(spec.probe_trainers) <= set(TRAINER_NAMES)


def test_timestep_ablation_variants_carry_their_T_into_the_network(preprocessed_plans):
    plans_manager, configuration_manager = preprocessed_plans
    assert sorted(cls.num_timesteps for cls in TIMESTEP_VARIANTS) == [1, 1, 3, 3, 30, 30, 100, 100, 1000, 1000]
    assert nnUNetTrainerDiffPretrainBPR.num_timesteps == nnUNetTrainerDiffPretrain.num_timesteps == 10
    for cls in TIMESTEP_VARIANTS:
        assert cls.__name__.endswith(f"_T{cls.num_timesteps}")
        assert cls.__name__.startswith(next(b.__name__ for b in (nnUNetTrainerDiffPretrainBPRX0,
                                                                nnUNetTrainerDiffPretrainBPR) if issubclass(cls, b)))
        network = cls.build_network_architecture(plans_manager, configuration_manager, 1, 3, False)
        assert int(network.num_timesteps) == cls.num_timesteps


class _IdentityDenoiser:
    """Stands in for the network: returns the clean patch, whatever the noisy input."""

    def __call__(self, data: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return data


@pytest.mark.parametrize("trainer_class,perfect", [(nnUNetTrainerDiffPretrain, False),
                                                   (nnUNetTrainerDiffPretrainX0, True)])
def test_x0_pretraining_regresses_the_clean_patch_and_epsilon_pretraining_the_noise(trainer_class, perfect):
    trainer = object.__new__(trainer_class)  # the loss needs no plans: network, loss and schedule only
    trainer.network, trainer.loss = _IdentityDenoiser(), torch.nn.MSELoss()
    trainer.scheduler = DiffusionScheduler(make_alphas_cumprod(trainer.noise_schedule, trainer.num_timesteps))
    loss = float(trainer.pretext_loss(torch.randn(2, 1, 8, 8, 8)))
    assert (loss == 0.0) == perfect
    assert ("x0" in trainer.objective) == perfect


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerDiffPretrainBPRX0", "nnUNetTrainerRestorePretrain"])
def test_self_supervised_trainers_draw_patches_at_random_not_by_label(demo_dataset, trainer_name):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(str(demo_dataset.dataset_id), CONFIGURATION, 0, trainer_name, PLANS,
                                    device=torch.device("cpu"))
    assert trainer.oversample_foreground_percent == 0.0


# --- Models Genesis distortions -------------------------------------------------------------------------------------

def test_bezier_curves_are_monotone_maps_of_the_unit_interval():
    u = torch.linspace(0, 1, 101)
    rising = bezier_curve(u, (0.9, 0.1), decreasing=False)
    falling = bezier_curve(u, (0.3, 0.8), decreasing=True)
    assert (rising.diff() >= 0).all() and (falling.diff() <= 0).all()
    assert rising[0] == 0 and rising[-1] == 1 and falling[0] == 1 and falling[-1] == 0
    assert not torch.allclose(rising, u)  # non-linear


def test_nonlinear_intensity_keeps_the_range_and_the_voxel_order():
    torch.manual_seed(0)
    sample = torch.randn(1, 8, 8, 8)
    transformed = nonlinear_intensity(sample)
    order, new_order = sample.flatten().argsort(), transformed.flatten().argsort()
    assert torch.equal(order, new_order) or torch.equal(order, new_order.flip(0))
    assert torch.isclose(transformed.min(), sample.min(), atol=1e-5)
    assert torch.isclose(transformed.max(), sample.max(), atol=1e-5)


def test_local_shuffle_only_moves_voxels_and_moves_channels_together():
    torch.manual_seed(0)
    image = torch.randn(1, 16, 16, 16)
    sample = torch.cat([image, 2 * image + 1])  # channel 1 is a function of channel 0
    shuffled = local_shuffle(sample, max_block_fraction=0.25, shuffled_block_share=1.0)
    assert not torch.equal(shuffled, sample)
    assert torch.equal(shuffled[0].flatten().sort().values, image.flatten().sort().values)
    assert torch.allclose(shuffled[1], 2 * shuffled[0] + 1)


def test_painting_fills_with_noise_in_the_intensity_range_and_keeps_part_of_the_image():
    torch.manual_seed(0)
    sample = torch.randn(1, 24, 24, 24)
    for painted in (inpaint(sample, 5, (1 / 6, 1 / 3)), outpaint(sample, 5, (3 / 7, 4 / 7))):
        kept = painted == sample
        assert 0 < kept.float().mean() < 1
        assert painted.min() >= sample.min() and painted.max() <= sample.max()


def test_genesis_distort_changes_each_sample_but_not_the_input():
    torch.manual_seed(1)
    batch = torch.randn(3, 1, 16, 16, 16)
    original = batch.clone()
    distorted = genesis_distort(batch)
    assert torch.equal(batch, original)
    assert distorted.shape == batch.shape and distorted.dtype == batch.dtype
    assert all(not torch.equal(d, b) for d, b in zip(distorted, batch))


# --- BPR guidance -----------------------------------------------------------------------------------------------------

def test_bpr_variable_unset_or_pointing_nowhere_gives_clear_errors(tmp_path):
    arguments = (PLANS, CONFIGURATION, "nnUNetPlans_3d_fullres", (32, 32, 32), (1.0, 1.0, 1.0))
    with pytest.raises(RuntimeError, match=f"{BPR_CHECKPOINT_VARIABLE} is not set.*nnUNetTrainerBPR"):
        bpr_guidance.load_guidance_bpr(*arguments, environment={})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bpr_guidance.load_guidance_bpr(*arguments, environment={BPR_CHECKPOINT_VARIABLE: str(tmp_path / "no.pth")})


def test_a_bpr_trained_on_other_plans_is_refused_with_the_differences_named(bpr_checkpoint):
    environment = {BPR_CHECKPOINT_VARIABLE: str(bpr_checkpoint)}
    bpr = bpr_guidance.load_guidance_bpr(PLANS, CONFIGURATION, "nnUNetPlans_3d_fullres", (32, 32, 32),
                                         (1.0, 1.0, 1.0), environment=environment)
    assert bpr.config.plans_identifier == PLANS
    with pytest.raises(ValueError, match=r"plans 'nnUNetPlansCPU' \(here 'nnUNetPlans'\).*patch size"):
        bpr_guidance.load_guidance_bpr("nnUNetPlans", "3d_fullres", "nnUNetPlans_3d_fullres", (48, 48, 48),
                                       (1.0, 1.0, 1.0), environment=environment)
    config = BPRConfig(patch_size=(64, 64, 64), plans_identifier="nnUNetPlans", data_identifier="nnUNetPlans_2d",
                       spacing=(2.0, 1.0, 1.0))
    problems = bpr_plans_mismatches(config, PLANS, "nnUNetPlans_3d_fullres", [32, 32, 32], [1.0, 1.0, 1.0])
    assert [p.split()[0] for p in problems] == ["plans", "preprocessed", "patch", "spacing"]


def test_embedded_bpr_takes_weights_and_intensity_settings_and_restores_them_from_a_state_dict():
    trained = build_bpr(BPRConfig(patch_size=(16, 16, 16), intensity_normalization="none"), seed=3).eval()
    embedded = EmbeddedBPR((16, 16, 16))
    assert embedded.model.config.intensity_normalization == "ct_window" and not bool(embedded.loaded)
    embedded.load_from(trained)
    patch = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(embedded(patch), trained.coordinate_map(patch).detach())
    copy = EmbeddedBPR((16, 16, 16))
    copy.load_state_dict(embedded.state_dict())
    assert copy.model.config.intensity_normalization == "none" and bool(copy.loaded)
    copy.train()
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())


def test_embedded_bpr_refuses_a_bpr_of_another_architecture():
    other = build_bpr(BPRConfig(patch_size=(16, 16, 16), features_per_stage=(8, 16)), seed=0)
    with pytest.raises(ValueError, match="features_per_stage"):
        EmbeddedBPR((16, 16, 16)).load_from(other)


def test_bpr_guidance_refuses_small_patches_and_several_channels(preprocessed_plans):
    plans_manager, configuration_manager = preprocessed_plans
    with pytest.raises(ValueError, match="single image channel"):
        nnUNetTrainerDiffPretrainBPR.build_network_architecture(plans_manager, configuration_manager, 2, 1, False)
    plans = json.loads(json.dumps(plans_manager.plans))
    plans["configurations"][CONFIGURATION]["patch_size"] = [4, 32, 32]
    small = PlansManager(plans)
    with pytest.raises(ValueError, match="too small for the BPR"):
        nnUNetTrainerDiffPretrainBPR.build_network_architecture(small, small.get_configuration(CONFIGURATION), 1, 1,
                                                                False)


def test_bpr_pretraining_without_the_variable_stops_before_training(demo_dataset, monkeypatch):
    monkeypatch.delenv(BPR_CHECKPOINT_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match=BPR_CHECKPOINT_VARIABLE):
        train_in_process(demo_dataset, "nnUNetTrainerDiffPretrainBPR", iterations=1)


# --- short trainings through nnU-Net -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(demo_dataset, bpr_checkpoint):
    """Each base pretraining trainer, the x0 variant and one timestep variant, trained for one iteration by
    nnU-Net's loop (found by nnU-Net's lookup)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BPR_CHECKPOINT_VARIABLE, str(bpr_checkpoint))
        return {name: train_in_process(demo_dataset, name, iterations=1, validate=True) for name in PRETRAINED}


PRETRAINED = ["nnUNetTrainerDiffPretrainBPR", "nnUNetTrainerDiffPretrainBPRX0_T30", "nnUNetTrainerDiffPretrain",
              "nnUNetTrainerRestorePretrain"]


@pytest.mark.parametrize("trainer_name", PRETRAINED)
def test_pretraining_logs_nnunet_keys_and_writes_a_self_contained_checkpoint(pretrained, trainer_name):
    trainer = pretrained[trainer_name]
    log = trainer.logger.get_checkpoint()
    assert np.isfinite(log["train_losses"]).all() and np.isfinite(log["val_losses"]).all()
    assert log["mean_fg_dice"] == [-v for v in log["val_losses"]]
    assert log["dice_per_class_or_region"] == [[]] and len(log["lrs"]) == len(log["epoch_end_timestamps"]) == 1
    assert os.path.isfile(f"{trainer.output_folder}/progress.png")
    checkpoint = torch.load(f"{trainer.output_folder}/checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == trainer_name
    weights = checkpoint["network_weights"]
    assert bool(weights["holds_pretrained_weights"])
    assert all(t.device.type == "cpu" for t in weights.values())
    if trainer_name.startswith("nnUNetTrainerDiffPretrainBPR"):
        assert bool(weights["bpr.loaded"]) and any(k.startswith("bpr.model.trunk") for k in weights)
        assert not any(p.requires_grad for p in trainer.network.bpr.parameters())
    with open(f"{trainer.output_folder}/validation/pretext_validation.json") as file:
        summary = json.load(file)
    assert summary["final_val_loss"] == pytest.approx(log["val_losses"][-1])
    assert summary["objective"] == trainer.objective
    assert all(name in summary["usage"] for name in trainer.backbone.probe_trainers)


def test_bpr_pretraining_keeps_the_bpr_frozen_while_the_denoiser_learns(pretrained, bpr_checkpoint):
    weights = torch.load(f"{pretrained['nnUNetTrainerDiffPretrainBPR'].output_folder}/checkpoint_final.pth",
                         weights_only=False)["network_weights"]
    original = bpr_guidance.load_bpr_from_nnunet_checkpoint(bpr_checkpoint)
    for name, value in original.named_parameters():
        assert torch.equal(weights[f"bpr.model.{name}"], value)


def test_stock_predict_on_a_pretraining_checkpoint_stops_and_says_to_train_a_probe(demo_dataset, pretrained,
                                                                                  tmp_path):
    result = predict(demo_dataset, "nnUNetTrainerDiffPretrain", tmp_path / "pred", extra=["--disable_tta"],
                     check=False)
    assert result.returncode != 0
    assert "not a segmentation model" in result.stderr and "nnUNetTrainerProbeNonLinear" in result.stderr
