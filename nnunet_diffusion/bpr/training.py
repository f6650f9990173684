"""Self-supervised BPR training (SSBR / bpreg style, on three axes) and its ordering evaluation.

A training sample is `num_slices` equidistant whole slices along one axis (the full field of view, resampled
to the BPR's slice size), `gap` voxels apart (physical step Δmm = gap × spacing, known), as bpreg trains on whole
axial slices: a slice's score then depends on the anatomy it shows, not on where a window was cut. With Δs_i the
consecutive score steps and
t = Δmm / mm_per_unit their target (scores are coordinates in units of mm_per_unit = 100 mm), all terms are
measured in units of δ = 10 mm / mm_per_unit so that their gradients are O(1) and bounded:

- ordering: bpreg's heuristic loss (σ(Δs/δ) − σ(t/δ))². It is minimal at Δs = t exactly, so unlike SSBR's
  −log σ(Δs) it does not keep inflating steps, and it penalises a wrong sign most;
- equidistance: SmoothL1((Δs_{i+1} − Δs_i)/δ), bpreg's distance loss: equal physical steps, equal score steps;
- scale: SmoothL1((mean_i Δs − t)/δ): ties the step to physical distance also for large gaps, where the
  sigmoid of the ordering loss saturates. This makes the three axes coordinates in the same unit
  (Δs ≈ Δmm / 100) and replaces bpreg's after-the-fact landmark calibration, which needs landmarks;
- a weak L2 on the scores (bpreg's λ term) that pins the otherwise free additive constant near zero.

Steps are deliberately not divided by their target: that would weight pairs of adjacent, nearly identical
slices up to 20× more than clearly different ones, and the BPR then collapses to constant scores.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_diffusion.bpr.model import (AXIS_NAMES, DEFAULT_FEATURES_PER_STAGE, BPRConfig, BPRModel, build_bpr,
                                        resized_slices)

# Slices whose intensity standard deviation is below this fraction of the volume's are background.
MIN_RELATIVE_SLICE_STD = 0.15


@dataclass(frozen=True)
class BPRLossWeights:
    ordering: float = 1.0
    # Weak on purpose: at weight 1 the easiest way to make all steps equal early in training is to make them
    # all zero, and the BPR collapses to constant scores (bpreg's public model uses 0).
    equidistance: float = 0.1
    scale: float = 1.0
    score_l2: float = 1e-3
    resolution_mm: float = 10.0


def bpr_loss(scores: torch.Tensor, step_mm: torch.Tensor, mm_per_unit: float,
             weights: BPRLossWeights = BPRLossWeights()) -> tuple[torch.Tensor, dict[str, float]]:
    """scores (N, m) of equidistant slices in increasing position, step_mm (N,) → (total loss, terms for logs)."""
    if scores.ndim != 2 or scores.shape[1] < 3:
        raise ValueError(f"need scores of shape (N, m) with m >= 3 slices per sample, got {tuple(scores.shape)}")
    resolution = weights.resolution_mm / mm_per_unit
    steps = (scores[:, 1:] - scores[:, :-1]) / resolution
    target = (step_mm / weights.resolution_mm).to(scores.dtype)[:, None]
    terms = {
        "ordering": ((torch.sigmoid(steps) - torch.sigmoid(target)) ** 2).mean(),
        "equidistance": F.smooth_l1_loss(steps[:, 1:], steps[:, :-1]),
        "scale": F.smooth_l1_loss(steps.mean(dim=1, keepdim=True), target),
        "score_l2": (scores ** 2).mean(),
    }
    total = (weights.ordering * terms["ordering"] + weights.equidistance * terms["equidistance"]
             + weights.scale * terms["scale"] + weights.score_l2 * terms["score_l2"])
    return total, {name: float(value.detach()) for name, value in terms.items()}


def informative_slices(slices: torch.Tensor, reference_std: float,
                       min_relative_std: float = MIN_RELATIVE_SLICE_STD) -> torch.Tensor:
    """(m, 1, h, w) → (m,) bool: slices whose intensity spread shows anatomy rather than background.

    A window of pure air (or of one homogeneous organ) has the spread of the image noise only; its position
    cannot be known, as bpreg's exclusion of background slices acknowledges. Relative to the volume's own
    spread, so the rule holds for raw HU and for nnU-Net-normalised intensities alike.
    """
    return slices.flatten(1).std(dim=1) > min_relative_std * reference_std


def sample_equidistant_slices(volume: torch.Tensor, axis: int, num_slices: int, rng: np.random.Generator,
                              window: tuple[int, int] | None = None, valid_range: tuple[int, int] | None = None,
                              reference_std: float | None = None, max_tries: int = 8) -> tuple[torch.Tensor, int]:
    """Pick `num_slices` equidistant slices along `axis` of a (D0, D1, D2) volume: whole slices, or cropped to one
    random `window`.

    valid_range (first, last) restricts the slice positions (e.g. to exclude padding). With reference_std,
    draws are repeated (up to max_tries, then the last draw is kept) until every slice is informative.
    Returns ((num_slices, 1, *window) slices in increasing position, gap in voxels).
    """
    first, last = valid_range if valid_range is not None else (0, volume.shape[axis] - 1)
    extent = last - first + 1
    if extent < num_slices:
        raise ValueError(f"only {extent} slices along axis {axis} ({AXIS_NAMES[axis]}), need at least {num_slices}")
    along_axis = volume.movedim(axis, 0)
    in_plane = along_axis.shape[1:]
    window = tuple(in_plane) if window is None else window
    if any(w > s for w, s in zip(window, in_plane)):
        raise ValueError(f"window {window} does not fit slices of shape {tuple(in_plane)}")
    for _ in range(max_tries):
        gap = int(rng.integers(1, (extent - 1) // (num_slices - 1) + 1))
        start = first + int(rng.integers(0, extent - (num_slices - 1) * gap))
        top, left = (int(rng.integers(0, s - w + 1)) for s, w in zip(in_plane, window))
        slices = along_axis[start:start + (num_slices - 1) * gap + 1:gap, top:top + window[0], left:left + window[1]]
        slices = slices[:, None]
        if reference_std is None or bool(informative_slices(slices, reference_std).all()):
            break
    return slices, gap


def train_bpr(volumes: Sequence[tuple[np.ndarray, tuple[float, float, float]]], iterations: int = 500, *,
              slice_size: tuple[int, int] = (64, 64), batch_size: int = 8, num_slices: int = 4,
              learning_rate: float = 1e-3,
              intensity_normalization: str = "ct_window", ct_window: tuple[float, float] = (-1000.0, 1500.0),
              features_per_stage: tuple[int, ...] = DEFAULT_FEATURES_PER_STAGE,
              loss_weights: BPRLossWeights = BPRLossWeights(), plans_identifier: str | None = None, seed: int = 0,
              device: str | torch.device = "cpu") -> BPRModel:
    """Train a BPR on (array (z, y, x), spacing (z, y, x) in mm) volumes; deterministic for a seed on one device.

    Each iteration trains one axis (cycling axial, coronal, sagittal) on `batch_size` samples of whole slices
    from random volumes. iterations=0
    returns the initial model of that seed (the untrained baseline). The returned model is in eval mode.
    """
    if not volumes:
        raise ValueError("train_bpr needs at least one volume")
    if num_slices < 3:
        raise ValueError(f"num_slices must be >= 3 (the equidistance loss compares consecutive steps), "
                         f"got {num_slices}")
    for array, spacing in volumes:
        if array.ndim != 3 or len(spacing) != 3:
            raise ValueError(f"volumes must be (3D array, 3 spacings), got shape {array.shape} and {spacing}")
    spacing_values = {tuple(float(s) for s in spacing) for _, spacing in volumes}
    smallest = tuple(int(s) for s in np.min([array.shape for array, _ in volumes], axis=0))
    config = BPRConfig(patch_size=smallest, slice_size=tuple(slice_size),
                       intensity_normalization=intensity_normalization, ct_window=ct_window,
                       features_per_stage=tuple(features_per_stage), plans_identifier=plans_identifier,
                       spacing=spacing_values.pop() if len(spacing_values) == 1 else None)

    device = torch.device(device)
    model = build_bpr(config, seed=seed).to(device)
    tensors = [torch.as_tensor(np.asarray(array, dtype=np.float32)) for array, _ in volumes]
    volume_stds = [float(t.std()) for t in tensors]
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(iterations, 1),
                                                           eta_min=learning_rate * 0.05)
    model.train()
    for iteration in range(iterations):
        axis = iteration % 3
        stacks, steps_mm = [], []
        for volume_index in rng.integers(0, len(volumes), batch_size):
            slices, gap = sample_equidistant_slices(tensors[volume_index], axis, num_slices, rng,
                                                    reference_std=volume_stds[volume_index])
            stacks.append(resized_slices(slices, config.slice_size))
            steps_mm.append(gap * float(volumes[volume_index][1][axis]))
        scores = model.score_slices(torch.cat(stacks).to(device), axis).reshape(batch_size, num_slices)
        loss, _ = bpr_loss(scores, torch.tensor(steps_mm, device=device), config.mm_per_unit, loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
    return model.eval()
