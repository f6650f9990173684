"""How well coordinates written by `add-coordinates` match true positions: a dataset's coordinate channels against
those of the same cases with true coordinates (for the phantom, its image geometry), and a scan's coordinates at
the organ centroids of its segmentation.

The ordering Spearman that nnUNetTrainerBPR's validation reports cannot see offsets between cases; the per-case
slope and intercept and the pooled R² (`body_coordinates.position_agreement`, `pooled_r2`) can.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

from nnunet_diffusion.bpr.body_coordinates import pooled_r2, position_agreement
from nnunet_diffusion.bpr.model import AXIS_NAMES
from nnunet_diffusion.pretraining.coordinate_modulation import COORDINATES_KEY

IMAGE_SUFFIX = "_0000.nii.gz"
# label values of TotalSegmentator's segmentations (its example_seg.nii.gz) of the organs the phantom models
TOTALSEGMENTATOR_ORGANS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "liver",
                           6: "stomach", 7: "pancreas", 8: "right adrenal", 9: "left adrenal", 52: "aorta"}


def coordinate_agreement(predicted: Path, true: Path, bpr_validation: Path | None = None) -> dict:
    """Per case of the raw dataset `predicted` (e.g. probe phantoms with a BPR's coordinates), its coordinates
    against those of the same case in `true` per axis (slope and intercept), and the pooled R² per axis over all
    cases; with `bpr_validation` (the bpr_validation.json of nnUNetTrainerBPR) also its mean Spearman per axis.
    The coordinates are constant across each slice, so one profile along the axis holds them."""
    profiles: dict[str, list] = {name: [] for name in AXIS_NAMES}
    per_case: dict[str, dict] = {}
    for file in sorted(predicted.glob(f"images*/*{IMAGE_SUFFIX}")):
        per_case[file.name[:-len(IMAGE_SUFFIX)]] = rows = {}
        for axis, name in enumerate(AXIS_NAMES):
            relative = file.relative_to(predicted)
            predicted_line, true_line = _profile(predicted, relative, axis), _profile(true, relative, axis)
            agreement = position_agreement(predicted_line, true_line)
            rows[name] = {"slope": agreement.slope, "intercept": agreement.intercept}
            profiles[name].append((predicted_line, true_line))
    if not per_case:
        raise FileNotFoundError(f"{predicted} holds no images*/*{IMAGE_SUFFIX}")
    result = {"per_case": per_case,
              "pooled_r2": {name: pooled_r2(*zip(*pairs)) for name, pairs in profiles.items()}}
    if bpr_validation is not None:
        validation = json.loads(bpr_validation.read_text())["mean_per_axis"]
        result["spearman"] = {name: validation[name] for name in AXIS_NAMES}
    return result


def _profile(dataset: Path, first_channel: Path, axis: int) -> np.ndarray:
    """The coordinate along array `axis` of a case (given by its first channel's path in the dataset)."""
    channel = json.loads((dataset / "dataset.json").read_text())[COORDINATES_KEY]["channels"][axis]
    file = dataset / first_channel.parent / first_channel.name.replace(IMAGE_SUFFIX, f"_{channel:04d}.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
    return np.moveaxis(array, axis, 0)[:, 0, 0].astype(float)


def real_ct_organs(ct: Path, segmentation: Path, coordinates: Callable[[Sequence[Path]], np.ndarray],
                   organs: dict[int, str] | None = None) -> dict:
    """The axial coordinate (`coordinates`, an add-coordinates source such as `BPRCoordinates(checkpoint)`, of the
    scan) at each labelled organ's centroid, against the organ's true cranio-caudal position (the scan's own z in
    mm) and their order (Spearman over organs); `organs` maps label values to names (default: TotalSegmentator's)."""
    maps = coordinates([ct])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation)))
    image = sitk.ReadImage(str(ct))
    rows = []
    for value, name in (organs or TOTALSEGMENTATOR_ORGANS).items():
        voxels = np.argwhere(labels == value)
        if len(voxels) == 0:
            continue
        z = float(voxels[:, 0].mean())
        true_mm = image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, z))[2]
        rows.append({"organ": name, "bpr_axial": float(maps[0, int(round(z)), 0, 0]), "true_z_mm": true_mm})
    order = spearmanr([r["bpr_axial"] for r in rows], [r["true_z_mm"] for r in rows]).statistic
    return {"organs": rows, "spearman_over_organs": float(order)}
