"""Dice and HD95 per label or region, following nnU-Net's conventions so numbers are comparable to its summary.json.

Masks and Dice reuse nnU-Net's own helpers (`region_or_label_to_mask`, `compute_tp_fp_fn_tn`); nnU-Net has no
HD95, so that one is implemented here. Labels are ints, regions are tuples of labels (nnU-Net's region-based
training); results are keyed by `str(label_or_region)` exactly as nnU-Net's summary.json is.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import (compute_tp_fp_fn_tn, label_or_region_to_key,
                                                      region_or_label_to_mask)
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from nnunet_diffusion.utils import geometry_mismatch, nanmean

LabelOrRegion = int | tuple[int, ...]

METRICS = ("Dice", "HD95")


def dice(mask_ref: np.ndarray, mask_pred: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nnU-Net's convention: nothing to score)."""
    mask_ref, mask_pred = _as_mask_pair(mask_ref, mask_pred)
    tp, fp, fn, _ = compute_tp_fp_fn_tn(mask_ref, mask_pred)
    if tp + fp + fn == 0:
        return float("nan")
    return float(2 * tp / (2 * tp + fp + fn))


def hd95(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances in mm (pooled over both directions, as MedPy's hd95).

    `spacing` is in the masks' array axis order (for SimpleITK arrays: the image spacing reversed). Surfaces are
    the mask voxels with a face neighbour outside the mask (voxels on the image border count as surface).
    Conventions: both masks empty → NaN (nothing to score, like Dice); exactly one empty → the image diagonal
    in mm, a finite worst case so that means over cases stay finite and still penalise the miss.
    """
    mask_ref, mask_pred = _as_mask_pair(mask_ref, mask_pred)
    spacing_arr = np.asarray(spacing, dtype=float)
    if spacing_arr.shape != (mask_ref.ndim,) or np.any(spacing_arr <= 0):
        raise ValueError(f"spacing must be {mask_ref.ndim} positive numbers (one per mask axis), got {spacing}")
    has_ref, has_pred = bool(mask_ref.any()), bool(mask_pred.any())
    if not has_ref and not has_pred:
        return float("nan")
    if not (has_ref and has_pred):
        return float(np.linalg.norm(np.asarray(mask_ref.shape) * spacing_arr))
    # Surface-to-surface distances only involve voxels inside the union's bounding box; cropping to it gives
    # the same surfaces (a mask voxel on the box border is on its mask's border too) at a fraction of the cost.
    box = _bounding_box(mask_ref | mask_pred)
    surface_ref, surface_pred = _surface(mask_ref[box]), _surface(mask_pred[box])
    to_ref = distance_transform_edt(~surface_ref, sampling=spacing_arr)
    to_pred = distance_transform_edt(~surface_pred, sampling=spacing_arr)
    distances = np.concatenate([to_ref[surface_pred], to_pred[surface_ref]])
    return float(np.percentile(distances, 95))


def evaluate_case(pred_file: str | Path, ref_file: str | Path,
                  labels_or_regions: Sequence[LabelOrRegion]) -> dict:
    """Dice and HD95 of one prediction against its reference, per label or region.

    Raises ValueError when the prediction's geometry differs from the reference's, because voxel-wise metrics
    on misaligned grids would be silently wrong.
    """
    targets = _normalise_targets(labels_or_regions)
    pred_image, ref_image = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(ref_file))
    mismatch = geometry_mismatch(pred_image, ref_image)
    if mismatch:
        raise ValueError(f"prediction {pred_file} does not have the geometry of its reference {ref_file} "
                         f"({mismatch}); export predictions in the reference image's geometry")
    seg_pred, seg_ref = sitk.GetArrayFromImage(pred_image), sitk.GetArrayFromImage(ref_image)
    spacing = ref_image.GetSpacing()[::-1]  # SimpleITK arrays are (z, y, x), spacing is (x, y, z)
    metrics = {}
    for target in targets:
        mask_ref = region_or_label_to_mask(seg_ref, target)
        mask_pred = region_or_label_to_mask(seg_pred, target)
        metrics[label_or_region_to_key(target)] = {"Dice": dice(mask_ref, mask_pred),
                                                   "HD95": hd95(mask_ref, mask_pred, spacing)}
    return {"prediction_file": str(pred_file), "reference_file": str(ref_file), "metrics": metrics}


def evaluate_folder(pred_dir: str | Path, ref_dir: str | Path, labels_or_regions: Sequence[LabelOrRegion],
                    file_ending: str = ".nii.gz") -> dict:
    """Per-case and mean Dice/HD95 per label or region, plus the foreground mean, laid out like nnU-Net's summary.

    Means over cases ignore NaN (both masks empty), as nnU-Net does; `foreground_mean` is the mean of the
    per-class means without label 0. Unlike nnU-Net, the two folders must hold exactly the same cases, so that a
    partial prediction run cannot pass for a complete one.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    targets = _normalise_targets(labels_or_regions)
    pred_names = _case_files(pred_dir, "prediction", file_ending)
    ref_names = _case_files(ref_dir, "reference", file_ending)
    if not pred_names:
        raise ValueError(f"prediction folder {pred_dir} holds no '*{file_ending}' files; check the folder and "
                         f"file_ending")
    problems = []
    missing_ref = sorted(set(pred_names) - set(ref_names))
    missing_pred = sorted(set(ref_names) - set(pred_names))
    if missing_ref:
        problems.append(f"reference folder {ref_dir} lacks {', '.join(missing_ref)}")
    if missing_pred:
        problems.append(f"prediction folder {pred_dir} lacks {', '.join(missing_pred)}")
    if problems:
        raise ValueError("prediction and reference folders must hold the same cases: " + "; ".join(problems))

    per_case = [evaluate_case(pred_dir / name, ref_dir / name, targets) for name in pred_names]
    keys = [label_or_region_to_key(t) for t in targets]
    means = {k: {m: nanmean([c["metrics"][k][m] for c in per_case]) for m in METRICS} for k in keys}
    foreground = [k for k in keys if k != "0"]
    foreground_mean = {m: float(np.mean([means[k][m] for k in foreground])) if foreground else float("nan")
                       for m in METRICS}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground_mean}


def _as_mask_pair(mask_ref: np.ndarray, mask_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask_ref, mask_pred = np.asarray(mask_ref, dtype=bool), np.asarray(mask_pred, dtype=bool)
    if mask_ref.shape != mask_pred.shape:
        raise ValueError(f"reference mask {mask_ref.shape} and prediction mask {mask_pred.shape} differ in shape")
    return mask_ref, mask_pred


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    coords = np.argwhere(mask)
    return tuple(slice(lo, hi + 1) for lo, hi in zip(coords.min(0), coords.max(0)))


def _normalise_targets(labels_or_regions: Sequence[LabelOrRegion]) -> list[LabelOrRegion]:
    """Lists (as regions come back from JSON) become tuples so keys match nnU-Net's `str(region)` keys."""
    targets = [tuple(int(i) for i in t) if isinstance(t, (list, tuple)) else int(t) for t in labels_or_regions]
    if not targets:
        raise ValueError("labels_or_regions is empty; pass the labels (ints) or regions (tuples) to evaluate")
    return targets


def _case_files(folder: Path, role: str, file_ending: str) -> list[str]:
    if not folder.is_dir():
        raise ValueError(f"{role} folder {folder} does not exist")
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(file_ending))


def evaluation_targets(label_manager: LabelManager) -> list[int | tuple[int, ...]]:
    """What nnU-Net's own evaluation scores: foreground regions for region-based models, else foreground labels."""
    return list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)


def target_names(dataset_json: dict) -> dict[str, str]:
    """Metric key (`str(label)` or `str(region)`, as in nnU-Net's summary.json) → the label's name."""
    return {str(tuple(value) if isinstance(value, list) else value): name
            for name, value in dataset_json["labels"].items()}
