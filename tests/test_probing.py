"""Probes and fine-tuning on pretraining checkpoints, loaded the way `nnUNetv2_train -pretrained_weights` does,
trained with nnU-Net's loop and predicted with the stock `nnUNetv2_predict`."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_diffusion.pretraining.cached_probing import (cached_features, decoder_features_of, tile_starts,
                                                         train_head_on_cached)
from nnunet_diffusion.pretraining.heads import (LinearProbeHead, NonLinearProbeHead, concatenated_levels,
                                                head_on_voxels)
from nnunet_diffusion.trainers.pretraining import PRETRAINING_TRAINERS, nnUNetTrainerDiffPretrain, nnUNetTrainerRestorePretrain
from nnunet_diffusion.pretraining.network import BACKBONES, DIFFUSION_COORD, BackboneSpec, decoder_level_channels
from nnunet_diffusion.trainers.probes import (OLD_NAME_TRAINERS, PROBE_TRAINERS, ProbeTrainer,
                                              nnUNetTrainerProbeLinear, nnUNetTrainerProbeNonLinear,
                                              nnUNetTrainerProbeNonLinearCoord)
from nnunet_diffusion.trainer_support import unwrap
from nnunet_runs import CONFIGURATION, PLANS, model_folder, predict, predict_in_this_process, train_in_process

TRAINERS_BY_NAME = {cls.__name__: cls for cls in PRETRAINING_TRAINERS + PROBE_TRAINERS}
OLD_NAMES = {cls.__name__ for cls in OLD_NAME_TRAINERS}
# Every kind of trainer on the coordinate-guided backbone; `nnUNetTrainerFinetuneCoord` is an old name, whose
# checkpoints hold the earlier linear-head network.
COORD_PRETRAINED = ["nnUNetTrainerProbeNonLinearCoord", "nnUNetTrainerProbeLinearCoord",
                    "nnUNetTrainerPretrainedFinetuneCoord", "nnUNetTrainerFinetuneCoord"]
COORD_RANDOM_INIT = "nnUNetTrainerPretrainedFinetuneRandomInitCoord"


@pytest.fixture(scope="module")
def coordinate_pretraining_checkpoint(coordinate_dataset) -> Path:
    trainer = train_in_process(coordinate_dataset, "nnUNetTrainerDiffPretrainCoord", iterations=1)
    return Path(trainer.output_folder) / "checkpoint_final.pth"


def train_with_pretrained_weights(dataset, trainer_name: str, pretrained: Path | None, iterations: int = 2,
                                  fold: int = 0):
    """nnUNetv2_train's own sequence (get_trainer_from_args, maybe_load_checkpoint, run_training), shortened.
    Returns the trainer and its network's state dict right after the pretrained weights (if any) were loaded."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    shutil.rmtree(model_folder(dataset, trainer_name) / f"fold_{fold}", ignore_errors=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_n_proc_DA", "0")
        trainer = get_trainer_from_args(str(dataset.dataset_id), CONFIGURATION, fold, trainer_name, PLANS,
                                        device=torch.device("cpu"))
        trainer.num_iterations_per_epoch = iterations
        trainer.num_val_iterations_per_epoch = 1
        trainer.num_epochs = 1
        maybe_load_checkpoint(trainer, False, False, None if pretrained is None else str(pretrained))
        if not trainer.was_initialized:  # without -pretrained_weights nnU-Net initialises in run_training
            trainer.initialize()
        loaded = {k: v.clone() for k, v in unwrap(trainer.network).state_dict().items()}
        trainer.run_training()
    return trainer, loaded


def fabricated_checkpoint(trainer_class, plans, path: Path, num_input_channels: int = 1) -> Path:
    """A checkpoint file in nnU-Net's format holding a freshly built network of `trainer_class`."""
    network = trainer_class.build_network_architecture(*plans, num_input_channels, num_input_channels, False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": trainer_class.__name__}, path)
    return path


# --- heads and key layout -------------------------------------------------------------------------------------------

def test_linear_head_is_a_1x1_convolution_of_the_upsampled_concatenated_levels():
    torch.manual_seed(0)
    levels = [torch.randn(2, 6, 4, 4, 4), torch.randn(2, 3, 8, 8, 8), torch.randn(2, 2, 16, 16, 16)]
    head = LinearProbeHead([6, 3, 2], num_classes=4, ndim=3)
    convs = head.seg_layers.level_convs
    weight = torch.cat([conv.weight for conv in convs], dim=1)
    concatenated = concatenated_levels(levels, (16, 16, 16))
    expected = torch.nn.functional.conv3d(concatenated, weight, convs[0].bias)
    assert torch.allclose(head(levels, (16, 16, 16)), expected, atol=1e-5)


def test_nonlinear_head_is_pointwise_and_not_linear():
    torch.manual_seed(0)
    head = NonLinearProbeHead([4, 2], num_classes=3, ndim=3, hidden_channels=(8, 5))
    levels = [torch.randn(1, 4, 8, 8, 8), torch.randn(1, 2, 8, 8, 8)]
    out = head(levels, (8, 8, 8))
    assert out.shape == (1, 3, 8, 8, 8)
    shifted = head([torch.roll(level, 3, dims=2) for level in levels], (8, 8, 8))
    assert torch.allclose(shifted, torch.roll(out, 3, dims=2), atol=1e-6)  # no spatial context
    doubled = head([2 * level for level in levels], (8, 8, 8))
    bias_only = head([0 * level for level in levels], (8, 8, 8))
    assert not torch.allclose(doubled - bias_only, 2 * (out - bias_only), atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_head_on_cached_voxel_features_gives_the_logits_of_those_voxels_in_the_volume(ndim):
    """experiments/pretraining_phantom.py trains heads on cached features: the same head, the same logits."""
    torch.manual_seed(0)
    size = (8,) * ndim
    levels = [torch.randn(2, 6, *(4,) * ndim), torch.randn(2, 3, *size)]
    head = NonLinearProbeHead([6, 3], num_classes=4, ndim=ndim, hidden_channels=(8, 5))
    features = concatenated_levels(levels, size).movedim(1, -1).reshape(-1, 9)
    voxels = torch.tensor([0, 5, 77, 2 * 8 ** ndim - 1])
    expected = head(levels, size).movedim(1, -1).reshape(-1, 4)[voxels]
    assert torch.allclose(head_on_voxels(head, features[voxels], [6, 3]), expected, atol=1e-5)


# --- cached probing -------------------------------------------------------------------------------------------------

def test_tiles_cover_every_voxel_end_flush_and_short_axes_are_refused():
    starts = tile_starts(70, 32, 16)
    assert starts == [0, 16, 32, 38]
    assert set(range(70)) == {i for s in starts for i in range(s, s + 32)}
    assert tile_starts(32, 32, 16) == [0]
    with pytest.raises(ValueError, match="at least 32 voxels.*one has 20"):
        tile_starts(20, 32, 16)


def cached_probe(preprocessed_plans, tmp_path: Path) -> torch.nn.Module:
    """A non-linear probe on a (fabricated) diffusion pretraining checkpoint, loaded as -pretrained_weights does."""
    torch.manual_seed(0)
    network = nnUNetTrainerProbeNonLinear.build_network_architecture(*preprocessed_plans, 1, 3, False)
    load_pretrained_weights(network, str(fabricated_checkpoint(nnUNetTrainerDiffPretrain, preprocessed_plans,
                                                               tmp_path / "pretraining.pth")))
    return network


def test_cached_features_are_the_probe_networks_own_features_of_the_sampled_voxels(preprocessed_plans, tmp_path):
    network = cached_probe(preprocessed_plans, tmp_path)
    image = torch.randn(1, 32, 32, 32)
    voxel_index = torch.arange(32 ** 3).reshape(32, 32, 32)  # as labels: tell which voxels were sampled
    features, labels = cached_features(decoder_features_of(network), [(image, voxel_index)], tile=32, stride=16,
                                       voxels_per_tile=64, seed=0)
    assert features.shape[0] == labels.shape[0] == 64
    with torch.no_grad():
        logits = network(image[None]).flatten(2)[0].T[labels]
        cached = head_on_voxels(network.head, features, decoder_level_channels(network.unet))
    assert torch.allclose(cached, logits, atol=1e-4)


def test_a_case_shorter_than_the_tile_is_padded_as_the_predictor_pads_it_and_only_its_voxels_are_sampled(
        preprocessed_plans, tmp_path):
    network = cached_probe(preprocessed_plans, tmp_path)
    image = torch.randn(1, 31, 32, 20)
    voxel_index = torch.arange(31 * 32 * 20).reshape(31, 32, 20)
    features, labels = cached_features(decoder_features_of(network), [(image, voxel_index)], tile=32, stride=16,
                                       voxels_per_tile=256, seed=0)
    assert len(labels) == 256 and labels.min() >= 0
    padded = torch.nn.functional.pad(image, (6, 6, 0, 0, 0, 1))  # nnU-Net's pad_nd_image: half below, rest above
    with torch.no_grad():
        logits = network(padded[None])[0][:, :31, :, 6:26].flatten(1).T[labels]
        cached = head_on_voxels(network.head, features, decoder_level_channels(network.unet))
    assert torch.allclose(cached, logits, atol=1e-4)


def test_cached_sampling_takes_half_of_each_tile_from_the_foreground(preprocessed_plans, tmp_path):
    network = cached_probe(preprocessed_plans, tmp_path)
    label = torch.zeros(32, 32, 40, dtype=torch.long)
    label[4:8, 4:8, 4:8] = 2  # 64 foreground voxels
    _, labels = cached_features(decoder_features_of(network), [(torch.randn(1, 32, 32, 40), label)], tile=32,
                                stride=16, voxels_per_tile=100, seed=0)
    assert len(labels) == 2 * 100  # two tiles along the last axis
    assert (labels[:100] > 0).sum() >= 50  # the first tile holds the organ


def test_training_on_cached_features_changes_only_the_head_and_lowers_the_loss(preprocessed_plans, tmp_path):
    network = cached_probe(preprocessed_plans, tmp_path)
    image = torch.randn(1, 32, 32, 32)
    label = (image[0] > 0.5).long() + (image[0] > 1.5).long()
    features, labels = cached_features(decoder_features_of(network), [(image, label)], tile=32, stride=16,
                                       voxels_per_tile=2048, seed=0)
    backbone = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith("head.")}
    losses = train_head_on_cached(network.head, decoder_level_channels(network.unet), features, labels,
                                  iterations=60, learning_rate=1e-2, batch_voxels=512, seed=0)
    prior = torch.bincount(labels).float() / len(labels)
    prior_entropy = float(-(prior[prior > 0] * prior[prior > 0].log()).sum())  # the loss of knowing only the prior
    assert np.mean(losses[-10:]) < min(np.mean(losses[:10]), prior_entropy - 0.05)
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in backbone.items())


@pytest.mark.parametrize("probe_class", [c for c in PROBE_TRAINERS + OLD_NAME_TRAINERS if issubclass(c, ProbeTrainer)],
                         ids=lambda c: c.__name__)
def test_probe_backbone_keys_are_those_of_its_pretraining_network_and_only_the_head_is_new(probe_class,
                                                                                        preprocessed_plans):
    pretraining_class = TRAINERS_BY_NAME[probe_class.backbone.pretraining_trainer]
    channels = 4 if probe_class.backbone.coordinates else 1
    pretrained = pretraining_class.build_network_architecture(*preprocessed_plans, channels, 1, False).state_dict()
    probe = probe_class.build_network_architecture(*preprocessed_plans, channels, 3, False)
    for key, value in probe.state_dict().items():
        if ".seg_layers." in key:
            continue
        assert key in pretrained and pretrained[key].shape == value.shape, key
    trainable = {name for name, p in probe.named_parameters() if p.requires_grad}
    assert all(".seg_layers." in name for name, _ in probe.head.named_parameters(prefix="head"))
    probe.train()
    if probe_class.freeze_backbone:
        assert trainable == {name for name, _ in probe.head.named_parameters(prefix="head")}
        assert probe.head.training and not probe.unet.training
    else:  # the old fine-tuning names: the backbone is trained too
        assert any(name.startswith("unet.encoder.") for name in trainable)


# --- bad inputs -------------------------------------------------------------------------------------------------------

def test_a_checkpoint_of_another_pretraining_is_refused_naming_the_key(preprocessed_plans, tmp_path):
    restorative = fabricated_checkpoint(nnUNetTrainerRestorePretrain, preprocessed_plans, tmp_path / "r.pth")
    probe = nnUNetTrainerProbeNonLinearCoord.build_network_architecture(*preprocessed_plans, 4, 3, False)
    with pytest.raises(AssertionError, match=r"[Kk]ey (unet|time_embedding|num_timesteps)\S*"):
        load_pretrained_weights(probe, str(restorative))


def test_a_probe_on_a_dataset_with_other_input_channels_is_refused_naming_the_first_convolution(
        preprocessed_plans, tmp_path):
    one_channel = fabricated_checkpoint(nnUNetTrainerDiffPretrain, preprocessed_plans, tmp_path / "d.pth")
    probe = nnUNetTrainerProbeLinear.build_network_architecture(*preprocessed_plans, 2, 3, False)
    with pytest.raises(AssertionError, match="unet.encoder.stages.0.0.convs.0.conv.weight"):
        load_pretrained_weights(probe, str(one_channel))
    with pytest.raises(ValueError, match="needs image channels besides the 3 coordinate channels"):
        nnUNetTrainerProbeNonLinearCoord.build_network_architecture(*preprocessed_plans, 3, 3, False)


def test_a_probe_without_pretrained_weights_stops_before_training(coordinate_dataset):
    with pytest.raises(RuntimeError, match="-pretrained_weights .*nnUNetTrainerDiffPretrainCoord"):
        train_with_pretrained_weights(coordinate_dataset, "nnUNetTrainerProbeNonLinearCoord", None)


# --- pretraining checkpoint → probe / fine-tuning → stock prediction -----------------------------------------------

@pytest.fixture(scope="module")
def probed(coordinate_dataset, coordinate_pretraining_checkpoint):
    trained = {name: train_with_pretrained_weights(coordinate_dataset, name, coordinate_pretraining_checkpoint)
               for name in COORD_PRETRAINED}
    return {**trained, COORD_RANDOM_INIT: train_with_pretrained_weights(coordinate_dataset, COORD_RANDOM_INIT, None)}


def _final_weights(trainer) -> dict[str, torch.Tensor]:
    return torch.load(f"{trainer.output_folder}/checkpoint_final.pth", weights_only=False)["network_weights"]


@pytest.mark.parametrize("trainer_name", COORD_PRETRAINED)
def test_probing_trains_the_head_only_and_fine_tuning_everything(probed, coordinate_pretraining_checkpoint,
                                                                 trainer_name):
    """The new layers are the keys with `.seg_layers.` (a probe's head, the fine-tuned UNet's output layers);
    -pretrained_weights filled every other one."""
    trainer, loaded = probed[trainer_name]
    pretrained = torch.load(coordinate_pretraining_checkpoint, weights_only=False)["network_weights"]
    final = _final_weights(trainer)
    backbone = [k for k in final if ".seg_layers." not in k]
    new_layers = [k for k in final if k.startswith("head.")] or [k for k in final if ".seg_layers." in k]
    assert all(torch.equal(loaded[k], pretrained[k]) for k in backbone)
    assert any(not torch.equal(final[k], loaded[k]) for k in new_layers)
    weights_changed = [not torch.equal(final[k], pretrained[k]) for k in backbone if k.startswith("unet.")]
    assert any(weights_changed) != getattr(trainer, "freeze_backbone", False)  # frozen backbones are bit-identical
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.network.parameters() if p.requires_grad}
    assert trainer.logger.get_value("lrs", step=0) == trainer.learning_rate  # fine-tuning: 1 epoch, all warm-up


def test_fine_tuning_trains_the_whole_unet_with_deep_supervision(probed):
    trainer, _ = probed["nnUNetTrainerPretrainedFinetuneCoord"]
    assert trainer.enable_deep_supervision and isinstance(trainer.loss, DeepSupervisionWrapper)
    assert all(p.requires_grad for p in trainer.network.parameters())


def test_the_random_init_control_trains_without_pretrained_weights(probed, coordinate_pretraining_checkpoint):
    trainer, loaded = probed[COORD_RANDOM_INIT]
    pretrained = torch.load(coordinate_pretraining_checkpoint, weights_only=False)["network_weights"]
    assert not bool(loaded["holds_pretrained_weights"])
    assert not any(torch.equal(loaded[k], pretrained[k]) for k in loaded if k.endswith("conv.weight"))
    final = _final_weights(trainer)
    assert any(not torch.equal(final[k], loaded[k]) for k in final if k.startswith("unet.encoder."))


def test_the_random_init_control_refuses_pretrained_weights(coordinate_dataset, coordinate_pretraining_checkpoint):
    with pytest.raises(RuntimeError, match="from random weights.*drop -pretrained_weights.*"
                                           "nnUNetTrainerPretrainedFinetuneCoord"):
        train_with_pretrained_weights(coordinate_dataset, COORD_RANDOM_INIT, coordinate_pretraining_checkpoint,
                                      fold=1)  # fold 0 is the trained control


@pytest.mark.parametrize("trainer_name", [*COORD_PRETRAINED, COORD_RANDOM_INIT])
def test_every_probe_and_fine_tuning_predicts_with_stock_nnunetv2_predict(coordinate_dataset, probed, tmp_path,
                                                                         trainer_name):
    """nnU-Net's predictor builds the network of the class the checkpoint names; a checkpoint of an old name is
    predicted in a new process, as it would be after an upgrade. The test images of the coordinate dataset carry
    their coordinate channels, as add-coordinates writes them for new images."""
    trainer, _ = probed[trainer_name]
    assert torch.load(f"{trainer.output_folder}/checkpoint_final.pth", weights_only=False)["trainer_name"] == \
        trainer_name
    run_predictor = predict if trainer_name in OLD_NAMES else predict_in_this_process
    run_predictor(coordinate_dataset, trainer_name, tmp_path / "pred", extra=["--disable_tta"])
    for image in sorted(coordinate_dataset.test_images.glob("*_0000.nii.gz")):
        prediction = sitk.ReadImage(str(tmp_path / "pred" / image.name.replace("_0000", "")))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}


@pytest.mark.parametrize("backbone", [spec for spec in BACKBONES if spec is not DIFFUSION_COORD],
                         ids=lambda spec: spec.pretraining_trainer)
def test_fine_tuning_and_its_control_on_the_other_backbones_train_and_predict(backbone: BackboneSpec, request,
                                                                              tmp_path):
    """The coordinate-guided backbone's trainers are checked above; these differ from them in what the network
    reads (no time input for the restorative backbones, no coordinates without `Coord`)."""
    dataset = request.getfixturevalue("coordinate_dataset" if backbone.coordinates else "demo_dataset")
    pretraining = train_in_process(dataset, backbone.pretraining_trainer, iterations=1)
    finetune = f"nnUNetTrainerPretrainedFinetune{backbone.trainer_suffix}"
    control = f"nnUNetTrainerPretrainedFinetuneRandomInit{backbone.trainer_suffix}"
    for name, weights in ((finetune, Path(pretraining.output_folder) / "checkpoint_final.pth"), (control, None)):
        _, loaded = train_with_pretrained_weights(dataset, name, weights)
        assert bool(loaded["holds_pretrained_weights"]) == (weights is not None)
        predict_in_this_process(dataset, name, tmp_path / name, extra=["--disable_tta"])
        assert len(list((tmp_path / name).glob("*.nii.gz"))) == len(list(dataset.test_images.glob("*_0000.nii.gz")))
