"""Pretraining trainers: Models Genesis distortions, coordinate-channel checks and augmentation, and short runs
through nnU-Net's loop."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from nnunet_diffusion.pretraining.coordinate_modulation import COORDINATES_KEY
from nnunet_diffusion.pretraining.network import BACKBONES
from nnunet_diffusion.pretraining.restoration import (bezier_curve, genesis_distort, inpaint, local_shuffle,
                                                      nonlinear_intensity, outpaint)
from nnunet_diffusion.core.scheduler import DiffusionScheduler
from nnunet_diffusion.core.schedules import make_alphas_cumprod
from nnunet_diffusion.trainers.coordinate_inputs import ImageChannelsOnly, check_coordinate_channels
from nnunet_diffusion.trainers.pretraining import (PRETRAINING_TRAINERS, nnUNetTrainerDiffPretrain,
                                                   nnUNetTrainerDiffPretrainCoord, nnUNetTrainerDiffPretrainCoordX0,
                                                   nnUNetTrainerDiffPretrainX0)
from nnunet_diffusion.trainers.probes import PROBE_TRAINERS
from nnunet_diffusion.trainers.pretraining_timesteps import TIMESTEP_VARIANTS
from nnunet_runs import CONFIGURATION, PLANS, predict, train_in_process

TRAINER_NAMES = [cls.__name__ for cls in PRETRAINING_TRAINERS + PROBE_TRAINERS]


# --- naming and signatures ------------------------------------------------------------------------------------------

def test_names_are_safe_and_every_backbone_has_its_probe_trainers():
    assert all("__" not in name for name in TRAINER_NAMES)
    assert len(set(TRAINER_NAMES)) == len(TRAINER_NAMES)
    for spec in BACKBONES:
        assert spec.pretraining_trainer in TRAINER_NAMES
        assert set(spec.probe_trainers) <= set(TRAINER_NAMES)


def test_timestep_ablation_variants_carry_their_T_into_the_network(preprocessed_plans):
    plans_manager, configuration_manager = preprocessed_plans
    assert sorted(cls.num_timesteps for cls in TIMESTEP_VARIANTS) == [1, 1, 3, 3, 30, 30, 100, 100, 1000, 1000]
    assert nnUNetTrainerDiffPretrainCoord.num_timesteps == nnUNetTrainerDiffPretrain.num_timesteps == 10
    for cls in TIMESTEP_VARIANTS:
        assert cls.__name__.endswith(f"_T{cls.num_timesteps}")
        assert cls.__name__.startswith(next(b.__name__ for b in (nnUNetTrainerDiffPretrainCoordX0,
                                                                nnUNetTrainerDiffPretrainCoord) if issubclass(cls, b)))
        network = cls.build_network_architecture(plans_manager, configuration_manager, 4, 3, False)
        assert int(network.num_timesteps) == cls.num_timesteps


class _IdentityDenoiser:
    """Stands in for the network: returns the clean patch, whatever the noisy input."""
    num_image_channels = 1

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


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerDiffPretrainCoordX0", "nnUNetTrainerRestorePretrainCoord"])
def test_self_supervised_trainers_draw_patches_at_random_not_by_label(coordinate_dataset, trainer_name):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(str(coordinate_dataset.dataset_id), CONFIGURATION, 0, trainer_name, PLANS,
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


# --- coordinate channels -------------------------------------------------------------------------------------------

def test_datasets_with_and_without_coordinate_channels_are_refused_by_the_wrong_trainers():
    plain = {"channel_names": {"0": "CT"}}
    with_coordinates = {"channel_names": {"0": "CT", "1": "noNorm", "2": "noNorm", "3": "noNorm"},
                        COORDINATES_KEY: {"channels": [1, 2, 3]}}
    check_coordinate_channels(plain, False, "T")
    check_coordinate_channels(with_coordinates, True, "T")
    with pytest.raises(ValueError, match="T reads anatomical coordinates .* add-coordinates"):
        check_coordinate_channels(plain, True, "T")
    with pytest.raises(ValueError, match="would treat as image channels: use its coordinate variant"):
        check_coordinate_channels(with_coordinates, False, "T")
    with pytest.raises(ValueError, match="must be the last 3"):
        check_coordinate_channels({**with_coordinates, COORDINATES_KEY: {"channels": [0, 1, 2]}}, True, "T")


def test_coordinate_backbones_noise_the_image_channels_only(preprocessed_plans):
    network = nnUNetTrainerDiffPretrainCoordX0.build_network_architecture(*preprocessed_plans, 4, 1, False)
    assert network.num_image_channels == 1 and network.unet.decoder.seg_layers[-1].out_channels == 1
    first = network.unet.encoder.stages[0][0].convs[0].conv
    assert first.in_channels == 4  # the noisy image and the three coordinates
    with pytest.raises(ValueError, match="needs image channels besides the 3 coordinate channels"):
        nnUNetTrainerDiffPretrainCoord.build_network_architecture(*preprocessed_plans, 3, 1, False)


def test_intensity_augmentation_leaves_the_coordinate_channels_alone():
    transforms = nnUNetTrainerDiffPretrainCoord.get_training_transforms(
        (16, 16, 16), (0.0, 0.0), None, (0, 1, 2), False, use_mask_for_norm=[False] * 4,
        foreground_labels=[1, 2])
    wrapped = [t for t in transforms.transforms if isinstance(t, ImageChannelsOnly)]
    assert len(wrapped) >= 5
    torch.manual_seed(0)
    image, coordinates = torch.randn(1, 16, 16, 16), torch.rand(3, 16, 16, 16) * 5
    sample = {"image": torch.cat([image, coordinates]), "segmentation": torch.zeros(1, 16, 16, 16)}
    for transform in wrapped:
        out = transform.transform.transform(**{"image": image.clone()})  # what it does to the image alone
        changed = transform(**{k: v.clone() for k, v in sample.items()})
        assert torch.equal(changed["image"][1:], coordinates)
        assert changed["image"].shape == sample["image"].shape and out["image"].shape == image.shape
    plain = nnUNetTrainerDiffPretrain.get_training_transforms((16, 16, 16), (0.0, 0.0), None, (0, 1, 2), False,
                                                              use_mask_for_norm=[False], foreground_labels=[1, 2])
    assert not any(isinstance(t, ImageChannelsOnly) for t in plain.transforms)


def test_a_coordinate_trainer_on_a_dataset_without_coordinates_stops_before_training(demo_dataset):
    with pytest.raises(ValueError, match="reads anatomical coordinates"):
        train_in_process(demo_dataset, "nnUNetTrainerDiffPretrainCoord", iterations=1)


# --- short trainings through nnU-Net -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(demo_dataset, coordinate_dataset):
    """Each base pretraining trainer, the x0 variant and one timestep variant, trained for one iteration by
    nnU-Net's loop (found by nnU-Net's lookup); the coordinate ones on the dataset with coordinate channels."""
    return {name: train_in_process(coordinate_dataset if "Coord" in name else demo_dataset, name, iterations=1,
                                   validate=True) for name in PRETRAINED}


PRETRAINED = ["nnUNetTrainerDiffPretrainCoord", "nnUNetTrainerDiffPretrainCoordX0_T30", "nnUNetTrainerDiffPretrain",
              "nnUNetTrainerRestorePretrain", "nnUNetTrainerRestorePretrainCoord"]


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
    modulations = [k for k in weights if k.endswith("to_scale_shift.weight") and weights[k].shape[-1] == 3]
    assert bool(modulations) == ("Coord" in trainer_name)
    with open(f"{trainer.output_folder}/validation/pretext_validation.json") as file:
        summary = json.load(file)
    assert summary["final_val_loss"] == pytest.approx(log["val_losses"][-1])
    assert summary["objective"] == trainer.objective
    assert all(name in summary["usage"] for name in trainer.backbone.probe_trainers)


def test_stock_predict_on_a_pretraining_checkpoint_stops_and_says_to_train_a_probe(demo_dataset, pretrained,
                                                                                  tmp_path):
    result = predict(demo_dataset, "nnUNetTrainerDiffPretrain", tmp_path / "pred", extra=["--disable_tta"],
                     check=False)
    assert result.returncode != 0
    assert "not a segmentation model" in result.stderr and "nnUNetTrainerProbeNonLinear" in result.stderr
