"""Dice/HD95 against hand-computed cases, nnU-Net's empty-mask conventions and evaluate_folder's input checks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from nnunet_diffusion.evaluation.metrics import dice, evaluate_case, evaluate_folder, hd95


def cube(shape: tuple[int, ...], start: tuple[int, ...], edge: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + edge) for s in start)] = True
    return mask


def write_seg(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


# Two 4³ cubes, the prediction shifted by 2 voxels along axis 0: they share 2·4·4 = 32 of 64 voxels each.
REF = cube((12, 10, 10), (2, 3, 3), 4)
PRED = cube((12, 10, 10), (4, 3, 3), 4)


def test_dice_of_offset_cubes_is_counted_overlap():
    assert dice(REF, PRED) == pytest.approx(2 * 32 / (64 + 64))
    assert dice(REF, REF) == 1.0


def test_hd95_of_offset_cubes_honours_anisotropic_spacing():
    # Per direction, of the 56 surface voxels 16 (the far face, > 5 %) lie 2 voxels away along axis 0, the rest
    # closer: HD95 is 2 voxels times the spacing of the shifted axis only.
    assert hd95(REF, PRED, (2.0, 1.0, 1.0)) == pytest.approx(4.0)
    assert hd95(REF, PRED, (1.0, 3.0, 3.0)) == pytest.approx(2.0)
    assert hd95(REF, REF, (2.0, 1.0, 1.0)) == 0.0


def test_hd95_drops_an_outlier_below_the_95th_percentile():
    ref = cube((20, 20, 20), (2, 2, 2), 6)
    pred = ref.copy()
    pred[18, 18, 18] = True  # 1 of 2·152 + 1 surface distances: a Hausdorff max would be ~ 12·√3
    assert hd95(ref, pred, (1.0, 1.0, 1.0)) == 0.0


def brute_force_hd95(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Independent reference: surface = mask voxel with a face neighbour outside the (zero-padded) mask."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    a, b = surface_points(ref), surface_points(pred)
    d = cdist(a, b)
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_blobs(seed: int):
    rng = np.random.default_rng(seed)
    shape, spacing = (9, 11, 8), (1.5, 0.7, 2.0)
    ref = rng.random(shape) < 0.3
    pred = rng.random(shape) < 0.3
    pred[:, :2] = False  # shifts the bounding boxes apart, exercising the crop
    assert hd95(ref, pred, spacing) == pytest.approx(brute_force_hd95(ref, pred, spacing))


def test_empty_mask_conventions():
    empty = np.zeros((4, 5, 6), dtype=bool)
    some = empty.copy()
    some[1, 2, 3] = True
    spacing = (1.0, 2.0, 3.0)
    assert math.isnan(dice(empty, empty))
    assert math.isnan(hd95(empty, empty, spacing))
    diagonal = math.sqrt((4 * 1.0) ** 2 + (5 * 2.0) ** 2 + (6 * 3.0) ** 2)
    for ref, pred in ((empty, some), (some, empty)):
        assert dice(ref, pred) == 0.0
        assert hd95(ref, pred, spacing) == pytest.approx(diagonal)


def test_hd95_rejects_spacing_of_wrong_length():
    with pytest.raises(ValueError, match="spacing"):
        hd95(REF, PRED, (1.0, 1.0))


def test_evaluate_case_labels_and_regions(tmp_path: Path):
    ref = np.array([1, 1, 1, 1, 2, 2, 2, 2, 0, 0]).reshape(1, 1, 10)
    pred = np.array([1, 1, 2, 2, 2, 2, 2, 0, 0, 0]).reshape(1, 1, 10)
    result = evaluate_case(write_seg(pred, tmp_path / "p.nii.gz"), write_seg(ref, tmp_path / "r.nii.gz"),
                           [1, 2, (1, 2), [2]])
    metrics = result["metrics"]
    assert metrics["1"]["Dice"] == pytest.approx(2 * 2 / (4 + 2))
    assert metrics["2"]["Dice"] == pytest.approx(2 * 3 / (4 + 5))
    assert metrics["(1, 2)"]["Dice"] == pytest.approx(2 * 7 / (8 + 7))
    assert metrics["(2,)"]["Dice"] == metrics["2"]["Dice"]  # a list (as from JSON) is read as a region
    # Region (1, 2) in a one-voxel-thick image: every voxel is surface. Of the 7 + 8 distances only ref's x = 7
    # is non-zero (1 mm); the 95th percentile interpolates at rank 0.95 · 14 = 13.3 between 0 and 1 → 0.3.
    assert metrics["(1, 2)"]["HD95"] == pytest.approx(0.3)


def test_evaluate_case_reads_spacing_in_array_order(tmp_path: Path):
    # SimpleITK spacing is (x, y, z); the cubes are shifted along array axis 0, i.e. z, spaced 2 mm.
    pred = write_seg(PRED, tmp_path / "p.nii.gz", spacing=(1.0, 1.0, 2.0))
    ref = write_seg(REF, tmp_path / "r.nii.gz", spacing=(1.0, 1.0, 2.0))
    assert evaluate_case(pred, ref, [1])["metrics"]["1"]["HD95"] == pytest.approx(4.0)


def make_folders(tmp_path: Path, pred_cases: dict[str, np.ndarray], ref_cases: dict[str, np.ndarray],
                 spacing=(1.0, 1.0, 2.0)) -> tuple[Path, Path]:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    for folder, cases in ((pred_dir, pred_cases), (ref_dir, ref_cases)):
        folder.mkdir()
        for name, array in cases.items():
            write_seg(array, folder / f"{name}.nii.gz", spacing=spacing)
    return pred_dir, ref_dir


def test_evaluate_folder_means_skip_nan_and_foreground_mean(tmp_path: Path):
    both = REF.astype(np.uint8) + 2 * cube(REF.shape, (0, 0, 0), 2)
    pred_dir, ref_dir = make_folders(tmp_path, {"a": PRED, "b": both}, {"a": REF, "b": both})
    (pred_dir / "plans.json").write_text("{}")  # nnU-Net writes these next to predictions; they are not cases
    result = evaluate_folder(pred_dir, ref_dir, [1, 2])
    assert [Path(c["prediction_file"]).name for c in result["metric_per_case"]] == ["a.nii.gz", "b.nii.gz"]
    # case a: label 1 Dice 0.5 / HD95 2 voxels · 2 mm, label 2 absent from both (NaN); case b: perfect
    assert result["mean"]["1"] == pytest.approx({"Dice": (0.5 + 1) / 2, "HD95": (4.0 + 0) / 2})
    assert result["mean"]["2"] == pytest.approx({"Dice": 1.0, "HD95": 0.0})
    assert result["foreground_mean"] == pytest.approx({"Dice": (0.75 + 1) / 2, "HD95": (2.0 + 0) / 2})


def test_evaluate_folder_names_cases_missing_from_either_side(tmp_path: Path):
    pred_dir, ref_dir = make_folders(tmp_path, {"a": PRED, "only_pred": PRED}, {"a": REF, "only_ref": REF})
    with pytest.raises(ValueError) as error:
        evaluate_folder(pred_dir, ref_dir, [1])
    assert "only_pred.nii.gz" in str(error.value) and "only_ref.nii.gz" in str(error.value)


def test_evaluate_folder_rejects_missing_folder(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_folder(tmp_path / "nope", tmp_path, [1])


@pytest.mark.parametrize("change, what", [
    ({"spacing": (1.0, 1.0, 2.5)}, "spacing"),
    ({"origin": (0.0, 0.5, 0.0)}, "origin"),
])
def test_evaluate_folder_rejects_prediction_with_other_geometry(tmp_path: Path, change: dict, what: str):
    pred_dir, ref_dir = make_folders(tmp_path, {"a": PRED}, {"a": REF})
    write_seg(PRED, pred_dir / "a.nii.gz", **{"spacing": (1.0, 1.0, 2.0), **change})
    with pytest.raises(ValueError, match=what) as error:
        evaluate_folder(pred_dir, ref_dir, [1])
    assert str(pred_dir / "a.nii.gz") in str(error.value)


def test_evaluate_folder_rejects_prediction_of_other_size(tmp_path: Path):
    pred_dir, ref_dir = make_folders(tmp_path, {"a": PRED[:-1]}, {"a": REF})
    with pytest.raises(ValueError, match="size") as error:
        evaluate_folder(pred_dir, ref_dir, [1])
    assert str(pred_dir / "a.nii.gz") in str(error.value)


def test_geometry_within_tolerance_is_accepted(tmp_path: Path):
    pred_dir, ref_dir = make_folders(tmp_path, {"a": PRED}, {"a": REF})
    write_seg(PRED, pred_dir / "a.nii.gz", spacing=(1.0, 1.0, 2.0 + 1e-6), origin=(1e-6, 0.0, 0.0))
    assert evaluate_folder(pred_dir, ref_dir, [1])["mean"]["1"]["Dice"] == pytest.approx(0.5)
