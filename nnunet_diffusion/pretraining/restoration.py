"""Models Genesis distortions (Zhou et al., MICCAI 2019 / MedIA 2021) for the restorative pretraining baseline.

The network sees a distorted patch and restores the clean one. Each sample independently gets, with Models
Genesis' probabilities: a non-linear monotone intensity curve (p = 0.9), local voxel shuffling (p = 0.5) and
painting (p = 0.9), which is out-painting (80 %) or in-painting (20 %).

Models Genesis assumes intensities in [0, 1]; nnU-Net patches are normalised (z-scored or CT-normalised), so the
intensity curve and the painting noise work on each sample's and channel's own [min, max] range, mapped back
afterwards. Channels of one sample share the spatial choices (blocks, boxes) so they stay aligned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenesisSettings:
    nonlinear_probability: float = 0.9
    local_shuffle_probability: float = 0.5
    paint_probability: float = 0.9
    outpaint_share: float = 0.8  # of the painted samples; the rest are in-painted
    max_shuffle_block_fraction: float = 1 / 8  # largest shuffled block edge, as a fraction of the patch edge
    shuffled_block_share: float = 0.5  # expected share of the blocks whose voxels are shuffled
    max_boxes: int = 5
    inpaint_box_fraction: tuple[float, float] = (1 / 6, 1 / 3)  # box edge range for in-painting
    outpaint_box_fraction: tuple[float, float] = (3 / 7, 4 / 7)  # kept-box edge range for out-painting


def _uniform() -> float:
    return float(torch.rand(()))


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, ()))


def _intensity_range(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) of a (C, *spatial) sample, shaped to broadcast against it."""
    flat = sample.flatten(1)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)


def bezier_curve(u: torch.Tensor, control: tuple[float, float], decreasing: bool) -> torch.Tensor:
    """Cubic Bézier (Bernstein) curve through (0, 0) and (1, 1) with inner ordinates `control` (sorted, so the curve
    is monotone) applied to u in [0, 1]; `decreasing` mirrors it to 1 − f(u)."""
    low, high = sorted(control)
    curve = 3 * (1 - u) ** 2 * u * low + 3 * (1 - u) * u ** 2 * high + u ** 3
    return 1 - curve if decreasing else curve


def nonlinear_intensity(sample: torch.Tensor) -> torch.Tensor:
    """A random monotone (increasing or decreasing) intensity curve on each channel's own range."""
    low, high = _intensity_range(sample)
    span = (high - low).clamp_min(1e-6)
    u = (sample - low) / span
    curve = bezier_curve(u, (_uniform(), _uniform()), decreasing=_uniform() < 0.5)
    return curve * span + low


def local_shuffle(sample: torch.Tensor, max_block_fraction: float, shuffled_block_share: float) -> torch.Tensor:
    """Shuffle the voxels inside a random subset of equal, non-overlapping small blocks (same permutation for every
    channel); the block size and the grid offset are random. Voxel values are only moved, never changed."""
    spatial = sample.shape[1:]
    block = [_randint(1, max(1, int(size * max_block_fraction))) for size in spatial]
    counts = [size // edge for size, edge in zip(spatial, block)]
    offsets = [_randint(0, size - count * edge) for size, count, edge in zip(spatial, counts, block)]
    region = tuple(slice(o, o + n * b) for o, n, b in zip(offsets, counts, block))
    channels, ndim = sample.shape[0], len(spatial)
    interleaved = [v for pair in zip(counts, block) for v in pair]
    grid_first = [0] + [1 + 2 * a for a in range(ndim)] + [2 + 2 * a for a in range(ndim)]
    blocks = sample[(slice(None),) + region].reshape(channels, *interleaved).permute(grid_first)
    grid_shape = blocks.shape
    blocks = blocks.reshape(channels, math.prod(counts), math.prod(block))
    num_blocks, block_volume = blocks.shape[1:]
    keys = torch.rand(num_blocks, block_volume, device=sample.device)
    keep = torch.rand(num_blocks, device=sample.device) >= shuffled_block_share
    keys[keep] = torch.arange(block_volume, device=sample.device, dtype=keys.dtype)  # identity order
    order = keys.argsort(dim=1).expand(channels, -1, -1)
    shuffled = blocks.gather(2, order).reshape(grid_shape).permute(torch.tensor(grid_first).argsort().tolist())
    result = sample.clone()
    result[(slice(None),) + region] = shuffled.reshape(channels, *[n * b for n, b in zip(counts, block)])
    return result


def _random_box(spatial: tuple[int, ...], fraction: tuple[float, float]) -> tuple[slice, ...]:
    box = []
    for size in spatial:
        edge = _randint(max(1, int(size * fraction[0])), max(1, int(size * fraction[1])))
        start = _randint(0, size - edge)
        box.append(slice(start, start + edge))
    return tuple(box)


def _uniform_noise_like(sample: torch.Tensor) -> torch.Tensor:
    low, high = _intensity_range(sample)
    return low + (high - low) * torch.rand_like(sample)


def inpaint(sample: torch.Tensor, max_boxes: int, box_fraction: tuple[float, float]) -> torch.Tensor:
    """Replace 1..max_boxes random boxes by uniform noise in each channel's intensity range."""
    noise = _uniform_noise_like(sample)
    result = sample.clone()
    for _ in range(_randint(1, max_boxes)):
        box = (slice(None),) + _random_box(tuple(sample.shape[1:]), box_fraction)
        result[box] = noise[box]
    return result


def outpaint(sample: torch.Tensor, max_boxes: int, box_fraction: tuple[float, float]) -> torch.Tensor:
    """Replace everything by uniform noise except 1..max_boxes random boxes, which keep the original voxels."""
    result = _uniform_noise_like(sample)
    for _ in range(_randint(1, max_boxes)):
        box = (slice(None),) + _random_box(tuple(sample.shape[1:]), box_fraction)
        result[box] = sample[box]
    return result


def genesis_distort(batch: torch.Tensor, settings: GenesisSettings = GenesisSettings()) -> torch.Tensor:
    """Distort every sample of a (B, C, *spatial) batch independently; the input is left unchanged."""
    distorted = []
    for sample in batch.float():
        if _uniform() < settings.nonlinear_probability:
            sample = nonlinear_intensity(sample)
        if _uniform() < settings.local_shuffle_probability:
            sample = local_shuffle(sample, settings.max_shuffle_block_fraction, settings.shuffled_block_share)
        if _uniform() < settings.paint_probability:
            if _uniform() < settings.outpaint_share:
                sample = outpaint(sample, settings.max_boxes, settings.outpaint_box_fraction)
            else:
                sample = inpaint(sample, settings.max_boxes, settings.inpaint_box_fraction)
        distorted.append(sample)
    return torch.stack(distorted).to(batch.dtype)
