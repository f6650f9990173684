"""Per-case anatomical coordinates from a Body Part Regressor, and how well they match true positions.

bpreg scores every axial slice of a scan and smooths the scores along the axis. Here every whole slice along each
array axis (the full field of view, resampled to the BPR's slice size) is scored, background slices (too little
intensity spread to show anatomy) are left out, and a Theil–Sen line through (slice position in mm, score) gives
the case's coordinate along that axis: monotone, one slope and one offset per case and axis, robust to single
outlying slices. A voxel's coordinate is the line's value at its position, in BPR units (100 mm); it does not
depend on any patch or tile the voxel is later seen in.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr, theilslopes

from nnunet_diffusion.bpr.model import AXIS_NAMES, BPRModel
from nnunet_diffusion.bpr.training import informative_slices

SLICES_PER_PASS = 256
MIN_FIT_SLICES = 3


@dataclass(frozen=True)
class AxisLine:
    """A case's coordinate along one axis as a function of position: intercept + slope · mm."""
    slope: float  # BPR units per mm (1/100 for a perfectly scaled BPR)
    intercept: float  # the coordinate at position 0 mm
    slices: int  # informative slices the line was fitted to

    def at(self, positions_mm: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(positions_mm, dtype=np.float64)


@torch.no_grad()
def slice_scores(model: BPRModel, volume: np.ndarray | torch.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every whole slice along `axis` of a (D0, D1, D2) volume, and which slices are informative."""
    parameter = next(model.parameters())
    volume = torch.as_tensor(np.asarray(volume, dtype=np.float32)).to(parameter.device)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(volume.shape)}")
    slices = volume.movedim(axis, 0)[:, None]
    keep = informative_slices(slices, float(volume.std())).cpu().numpy()
    was_training = model.training
    model.eval()
    scores = torch.cat([model.score_slices(chunk, axis) for chunk in slices.split(SLICES_PER_PASS)])
    model.train(was_training)
    return scores.float().cpu().numpy(), keep


def fit_axis_line(positions_mm: np.ndarray, scores: np.ndarray) -> AxisLine:
    """Theil–Sen line of scores against positions (the median of pairwise slopes: outlying slices do not tilt it)."""
    positions_mm, scores = np.asarray(positions_mm, float), np.asarray(scores, float)
    if len(scores) < MIN_FIT_SLICES or np.ptp(positions_mm) == 0:
        raise ValueError(f"a coordinate line needs at least {MIN_FIT_SLICES} informative slices at distinct "
                         f"positions, got {len(scores)}: the image is too thin or mostly background along this axis")
    slope, intercept, _, _ = theilslopes(scores, positions_mm)
    return AxisLine(float(slope), float(intercept), len(scores))


def case_lines(model: BPRModel, volume: np.ndarray | torch.Tensor, positions_mm: Sequence[np.ndarray]
               ) -> list[AxisLine]:
    """One line per array axis; positions_mm[a] holds the position (mm, in whatever frame the caller keeps) of
    every slice along axis a."""
    lines = []
    for axis in range(3):
        scores, keep = slice_scores(model, volume, axis)
        if len(positions_mm[axis]) != len(scores):
            raise ValueError(f"{len(positions_mm[axis])} positions for {len(scores)} slices along axis {axis}")
        lines.append(fit_axis_line(np.asarray(positions_mm[axis])[keep], scores[keep]))
    return lines


def axis_maps(values: Sequence[np.ndarray]) -> np.ndarray:
    """(3, D0, D1, D2) float32: channel a holds values[a] along array axis a, constant across the other two."""
    shape = tuple(len(v) for v in values)
    maps = np.empty((3, *shape), np.float32)
    for axis, along in enumerate(values):
        view = [1, 1, 1]
        view[axis] = shape[axis]
        maps[axis] = np.broadcast_to(np.asarray(along, np.float32).reshape(view), shape)
    return maps


@torch.no_grad()
def ordering_spearman(model: BPRModel, volume: np.ndarray | torch.Tensor, spacing: Sequence[float]
                      ) -> dict[str, float]:
    """Per axis, Spearman correlation between whole-slice scores and slice position (1 = perfect ordering) over
    the informative slices; NaN for an axis with fewer than 3 of them or constant scores (undefined)."""
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers in array order, got {tuple(spacing)}")
    result = {}
    for axis, name in enumerate(AXIS_NAMES):
        scores, keep = slice_scores(model, volume, axis)
        scores = scores[keep]
        undefined = len(scores) < 3 or np.ptp(scores) == 0
        result[name] = float(np.nan) if undefined else float(
            spearmanr(np.flatnonzero(keep), scores).statistic)
    return result


@dataclass(frozen=True)
class PositionAgreement:
    """Predicted against true coordinate of one case along one axis: an ideal BPR has slope 1 and the same
    intercept in every case (one constant shared by all); Spearman alone cannot see offsets between cases."""
    slope: float
    intercept: float


def position_agreement(predicted: np.ndarray, true: np.ndarray) -> PositionAgreement:
    """Least-squares line of predicted on true coordinates (same units)."""
    slope, intercept = np.polyfit(np.asarray(true, float), np.asarray(predicted, float), 1)
    return PositionAgreement(float(slope), float(intercept))


def r_squared(values: np.ndarray, fitted: np.ndarray) -> float:
    values, fitted = np.asarray(values, float), np.asarray(fitted, float)
    total = float(((values - values.mean()) ** 2).sum())
    return float("nan") if total == 0 else 1.0 - float(((values - fitted) ** 2).sum()) / total


def pooled_r2(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> float:
    """R² of one line of predicted on true coordinates shared by all cases: offsets between cases count as
    errors, which the per-case Spearman and per-case R² do not see."""
    predicted = np.concatenate([np.asarray(p, float) for p in predicted])
    true = np.concatenate([np.asarray(t, float) for t in true])
    return r_squared(predicted, np.polyval(np.polyfit(true, predicted, 1), true))
