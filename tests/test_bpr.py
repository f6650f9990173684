"""The 3-axis Body Part Regressor: loss, sampling, learning on the phantom, coordinate maps, files, nnU-Net trainer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_diffusion.bpr import (AXIS_NAMES, BPRConfig, bpr_loss, build_bpr, load_bpr,
                                  load_bpr_from_nnunet_checkpoint, ordering_spearman, save_bpr, train_bpr)
from nnunet_diffusion.bpr.body_coordinates import case_lines, pooled_r2, position_agreement
from nnunet_diffusion.bpr.training import sample_equidistant_slices
from nnunet_diffusion.datasets.phantom import generate_phantom_dataset

SMALL_FEATURES = (8, 16, 32, 32)
# A soft-tissue window makes organ contrast visible to a small, briefly trained BPR.
SOFT_TISSUE_WINDOW = (-250.0, 350.0)
ORDERING_THRESHOLD = 0.4
AXIAL_POOLED_R2 = 0.4  # 0.65 measured (450 iterations, 6 phantoms); per-case offsets keep it below 1


@pytest.fixture(scope="module")
def phantom_volumes(tmp_path_factory):
    """6 training and 2 held-out phantom CTs as (array (z, y, x), spacing (z, y, x))."""
    folder = generate_phantom_dataset(tmp_path_factory.mktemp("raw"), num_train=6, num_test=2, seed=0)
    return _read(folder / "imagesTr"), _read(folder / "imagesTs")


def _read(folder) -> list[tuple[np.ndarray, tuple[float, ...]]]:
    images = [sitk.ReadImage(str(p)) for p in sorted(folder.iterdir())]
    return [(sitk.GetArrayFromImage(i).astype(np.float32), i.GetSpacing()[::-1]) for i in images]


@pytest.fixture(scope="module")
def held_out_positions(tmp_path_factory):
    """4 more held-out phantoms with their true positions: (array, spacing, origin (z, y, x) in torso mm)."""
    folder = generate_phantom_dataset(tmp_path_factory.mktemp("raw_positions"), num_train=4, num_test=0, seed=7)
    return [(array, spacing, sitk.ReadImage(str(p)).GetOrigin()[::-1])
            for (array, spacing), p in zip(_read(folder / "imagesTr"), sorted((folder / "imagesTr").iterdir()))]


def mean_ordering(model, volumes) -> tuple[float, dict[str, float]]:
    results = [ordering_spearman(model, volume, spacing) for volume, spacing in volumes]
    per_axis = {name: float(np.mean([r[name] for r in results])) for name in AXIS_NAMES}
    return float(np.mean(list(per_axis.values()))), per_axis


def test_loss_is_lowest_for_exact_coordinates():
    positions_mm = torch.tensor([[0.0, 20.0, 40.0, 60.0], [0.0, 5.0, 10.0, 15.0]])
    steps_mm = torch.tensor([20.0, 5.0])
    exact = positions_mm / 100

    def loss(scores):
        return float(bpr_loss(scores, steps_mm, mm_per_unit=100.0)[0])
    assert loss(exact) < loss(exact.flip(1))
    assert loss(exact) < loss(exact * 3) and loss(exact) < loss(exact / 3)
    assert loss(exact) < loss(torch.zeros_like(exact))
    uneven = exact.clone()
    uneven[:, 2] += 0.05
    assert loss(exact) < loss(uneven)
    with pytest.raises(ValueError, match="m >= 3"):
        bpr_loss(exact[:, :2], steps_mm, mm_per_unit=100.0)


def test_samples_are_equidistant_whole_slices_or_share_one_window():
    z, y, x = np.meshgrid(np.arange(20), np.arange(30), np.arange(40), indexing="ij")
    volume = torch.as_tensor(z * 10000 + y * 100 + x, dtype=torch.float32)
    rng = np.random.default_rng(0)
    for axis in range(3):
        window = tuple(s - 5 for d, s in enumerate(volume.shape) if d != axis)
        whole, _ = sample_equidistant_slices(volume, axis, 4, rng, valid_range=(2, 17))
        assert whole.shape == (4, 1, *(s for d, s in enumerate(volume.shape) if d != axis))
        slices, gap = sample_equidistant_slices(volume, axis, 4, rng, window=window, valid_range=(2, 17))
        assert slices.shape == (4, 1, *window)
        coordinate = (slices // 10 ** (4 - 2 * axis)) % 100  # the axis index encoded in the values
        positions = coordinate.flatten(1)[:, 0]
        assert torch.all(coordinate.flatten(1) == positions[:, None]), "a slice is orthogonal to its axis"
        assert torch.all(positions.diff() == gap) and gap >= 1
        assert positions.min() >= 2 and positions.max() <= 17
        in_plane = slices - coordinate * 10 ** (4 - 2 * axis)
        assert torch.all(in_plane == in_plane[0]), "same in-plane window for every slice"
    with pytest.raises(ValueError, match="need at least 4"):
        sample_equidistant_slices(volume, 0, 4, rng, valid_range=(0, 2))


def test_slices_of_any_extent_are_scored_at_the_slice_size_and_too_small_ones_are_refused():
    model = build_bpr(BPRConfig(patch_size=(16, 20, 24), features_per_stage=SMALL_FEATURES), seed=0).eval()
    volume = torch.randn(16, 20, 24) * 300
    with torch.no_grad():
        axial = model.score_slices(volume[:, None], 0)
        sagittal = model.score_slices(volume.permute(2, 0, 1)[:, None], 2)
        assert axial.shape == (16,) and sagittal.shape == (24,)
        assert torch.allclose(model(volume[:, None], 0), axial)
    assert model.config.min_size == 8
    with pytest.raises(ValueError, match=r"slice_size must be 2 sizes of at least 8"):
        BPRConfig(patch_size=(16, 16, 16), slice_size=(4, 64), features_per_stage=SMALL_FEATURES)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model.score_slices(volume[None], 0)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    config = BPRConfig(patch_size=(16, 16, 16), intensity_normalization="none", features_per_stage=SMALL_FEATURES,
                       spacing=(2.0, 1.0, 1.0), plans_identifier="nnUNetPlans", configuration="3d_fullres")
    model = build_bpr(config, seed=5).eval()
    save_bpr(model, tmp_path / "bpr.pth")
    loaded = load_bpr(tmp_path / "bpr.pth", map_location="cpu")
    slices = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.score_slices(slices, 1), loaded.score_slices(slices, 1))
    assert loaded.config == config and not loaded.training
    torch.save({"network_weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a BPR file written by save_bpr"):
        load_bpr(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an nnUNetTrainerBPR checkpoint"):
        load_bpr_from_nnunet_checkpoint(tmp_path / "other.pth")


def test_weights_of_another_architecture_are_refused():
    small = build_bpr(BPRConfig(patch_size=(16, 16, 16), features_per_stage=SMALL_FEATURES), seed=0)
    default = build_bpr(BPRConfig(patch_size=(16, 16, 16)), seed=0)
    with pytest.raises(ValueError, match=r"weights are for features_per_stage/head_hidden \(\(8, 16, 32, 32\)"):
        default.load_state_dict(small.state_dict())


def test_training_is_deterministic_for_a_seed(phantom_volumes, one_torch_thread):
    volumes = phantom_volumes[0][:2]
    first = train_bpr(volumes, 6, batch_size=2, features_per_stage=SMALL_FEATURES, seed=4)
    second = train_bpr(volumes, 6, batch_size=2, features_per_stage=SMALL_FEATURES, seed=4)
    other = train_bpr(volumes, 6, batch_size=2, features_per_stage=SMALL_FEATURES, seed=5)
    for name, value in first.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.axis_heads.weight, other.axis_heads.weight)


def test_trained_bpr_orders_held_out_volumes_and_an_untrained_one_does_not(phantom_volumes, held_out_positions,
                                                                            one_torch_thread, capsys):
    training, held_out = phantom_volumes
    settings = dict(batch_size=8, features_per_stage=SMALL_FEATURES, ct_window=SOFT_TISSUE_WINDOW, seed=0)
    untrained = train_bpr(training, 0, **settings)
    start = time.perf_counter()
    trained = train_bpr(training, 450, **settings)
    seconds = time.perf_counter() - start
    untrained_mean, untrained_axes = mean_ordering(untrained, held_out)
    trained_mean, trained_axes = mean_ordering(trained, held_out)
    with capsys.disabled():
        print(f"\nBPR Spearman on held-out phantoms: trained {trained_mean:.3f} {trained_axes} ({seconds:.0f} s), "
              f"untrained {untrained_mean:.3f} {untrained_axes}")
    assert trained_mean > ORDERING_THRESHOLD > untrained_mean
    assert trained_axes["axial"] > 0.8
    agreement = coordinate_agreement(trained, held_out_positions)
    with capsys.disabled():
        print("predicted vs true position on 4 held-out phantoms (slope, intercept per case; pooled R²):")
        for name, row in agreement.items():
            print(f"  {name}: {row}")
    assert agreement["axial"]["pooled_r2"] > AXIAL_POOLED_R2


def coordinate_agreement(model, cases) -> dict[str, dict]:
    """Per axis: whole-slice lines fitted with image-relative positions (what the BPR may know), compared with
    the true torso positions the phantom's origin holds."""
    result = {}
    lines_per_case = [case_lines(model, volume, [np.arange(n) * s for n, s in zip(volume.shape, spacing)])
                      for volume, spacing, _ in cases]
    for axis, name in enumerate(AXIS_NAMES):
        predicted, true = [], []
        for (volume, spacing, origin), lines in zip(cases, lines_per_case):
            relative = np.arange(volume.shape[axis]) * spacing[axis]
            predicted.append(lines[axis].at(relative))
            true.append((origin[axis] + relative) / 100)
        per_case = [position_agreement(p, t) for p, t in zip(predicted, true)]
        result[name] = {"slope": [round(a.slope, 2) for a in per_case],
                        "intercept": [round(a.intercept, 2) for a in per_case],
                        "pooled_r2": round(pooled_r2(predicted, true), 3)}
    return result


def test_trainer_has_no_spatial_augmentation():
    from nnunet_diffusion.trainers.bpr import nnUNetTrainerBPR, nnUNetTrainerBPR_smoke
    transforms = nnUNetTrainerBPR.get_training_transforms((32, 32, 32), (0.0, 0.0), None, None, False)
    names = [type(t.transform).__name__ for t in transforms.transforms]
    assert names and not any("Spatial" in n or "Mirror" in n or "RemoveLabel" in n for n in names)
    assert nnUNetTrainerBPR_smoke.bpr_features_per_stage == BPRConfig((8, 8, 8)).features_per_stage


def run_cli(arguments: list[str], environment: dict[str, str]) -> None:
    result = subprocess.run(arguments, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(arguments)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_nnunet_trainer_bpr_through_nnunets_cli(tmp_path):
    """Phantom → unlabeled dataset → nnUNetv2_plan_and_preprocess → nnUNetv2_train with the BPR trainer."""
    from nnunet_diffusion.datasets.unlabeled import images_to_dataset
    phantom = generate_phantom_dataset(tmp_path / "phantom", num_train=6, num_test=0, seed=2)
    dataset = images_to_dataset(phantom / "imagesTr", tmp_path / "raw", 602, "PhantomUnlabeled")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    (shim / "bpr_trainers.py").write_text("from nnunet_diffusion.trainers.bpr import *\n")
    environment = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
                       nnUNet_results=str(tmp_path / "results"), nnUNet_extTrainer=str(shim),
                       nnUNet_def_n_proc="2")
    bin_folder = os.path.dirname(sys.executable)
    run_cli([os.path.join(bin_folder, "nnUNetv2_plan_and_preprocess"), "-d", "602", "-c", "3d_fullres", "-np", "2"],
            environment)
    run_cli([os.path.join(bin_folder, "nnUNetv2_train"), "602", "3d_fullres", "0", "-tr", "nnUNetTrainerBPR_smoke",
             "-device", "cpu"], environment)

    fold = tmp_path / "results" / dataset.name / "nnUNetTrainerBPR_smoke__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "checkpoint_best.pth").is_file()
    assert not (fold / "validation").exists(), "the segmentation validation is skipped"
    splits = json.loads((tmp_path / "pre" / dataset.name / "splits_final.json").read_text())
    report = json.loads((fold / "bpr_validation.json").read_text())
    assert sorted(report["per_case"]) == sorted(splits[0]["val"])
    values = [v for case in report["per_case"].values() for v in case.values() if v is not None]
    assert values and all(-1 <= v <= 1 for v in values)

    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    assert len(checkpoint["logging"]["mean_fg_dice"]) == 2
    assert all(len(per_axis) == 3 for per_axis in checkpoint["logging"]["dice_per_class_or_region"])
    plans = json.loads((tmp_path / "pre" / dataset.name / "nnUNetPlans.json").read_text())
    bpr = load_bpr_from_nnunet_checkpoint(fold / "checkpoint_final.pth")
    assert bpr.config.patch_size == tuple(plans["configurations"]["3d_fullres"]["patch_size"])
    assert (bpr.config.plans_identifier, bpr.config.configuration) == ("nnUNetPlans", "3d_fullres")
    assert bpr.config.data_identifier == "nnUNetPlans_3d_fullres"
    assert bpr.config.intensity_normalization == "none"
    with torch.no_grad():
        assert bpr.score_slices(torch.randn(7, 1, 30, 20), 0).shape == (7,)
