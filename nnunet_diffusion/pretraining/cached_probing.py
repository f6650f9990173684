"""Probing on cached frozen features: the frozen backbone runs once per tile, the probe's head is trained on the
features of sampled voxels, and then predicts inside the probe network as nnU-Net's predictor calls it.

The probe trainers run the frozen backbone in every iteration; caching pays for it once, which makes several probe
seeds per backbone affordable on a CPU. The head and its input are exactly those of the probe network
(`head_on_voxels`), so a head trained here is the head `ProbeNetwork.forward` applies."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from nnunet_diffusion.pretraining.heads import concatenated_levels, head_on_voxels
from nnunet_diffusion.pretraining.network import ProbeNetwork


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start indices of `tile`-long windows, `stride` apart, that cover an axis of `length` (the last one flush
    with the end)."""
    if length < tile:
        raise ValueError(f"cached probing needs cases of at least {tile} voxels along every axis (the tile size); "
                         f"one has {length}: use a smaller tile or pad the case")
    return sorted(set(range(0, length - tile, stride)) | {length - tile})


def decoder_features_of(network: ProbeNetwork) -> Callable[[torch.Tensor], torch.Tensor]:
    """A probe network's frozen features of a (1, C, *tile) input: its decoder levels upsampled to the tile and
    concatenated, (F, *tile), what the head's first layer reads."""
    network.eval()
    return lambda tile: concatenated_levels(network.decoder_features(tile), tuple(tile.shape[2:]))[0]


@torch.no_grad()
def cached_features(features_of: Callable[[torch.Tensor], torch.Tensor],
                    cases: Iterable[tuple[torch.Tensor, torch.Tensor]], tile: int, stride: int, voxels_per_tile: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (`features_of` a (1, C, *tile) tile → (F, *tile), e.g. `decoder_features_of(probe)`) and labels of
    voxels sampled from overlapping tile³ tiles of every case, given as (image (C, *S), labels (*S)) pairs (a case
    shorter than a tile is padded as nnU-Net's predictor pads it). Half of each tile's sample is foreground (where
    there is any), so that small organs are represented."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = [], []
    for image, label in cases:
        image, label = padded_to_tile(image, label, tile)
        for start in _tile_grid(image.shape[1:], tile, stride):
            window = tuple(slice(s, s + tile) for s in start)
            tile_features = features_of(image[(slice(None), *window)][None]).flatten(1)
            tile_labels = label[window].flatten()
            foreground = torch.nonzero(tile_labels > 0)[:, 0]
            inside = torch.nonzero(tile_labels >= 0)[:, 0]
            chosen = foreground[torch.randperm(len(foreground), generator=generator)[:voxels_per_tile // 2]]
            rest = inside[torch.randint(len(inside), (voxels_per_tile - len(chosen),), generator=generator)]
            chosen = torch.cat([chosen, rest])
            features.append(tile_features[:, chosen].T.clone())
            labels.append(tile_labels[chosen])
    return torch.cat(features), torch.cat(labels)


def padded_to_tile(image: torch.Tensor, label: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A case shorter than the tile along an axis, padded there with zeros on both sides as nnU-Net's predictor
    pads an image smaller than its patch, so its features are computed as at prediction; the padded voxels get
    the label -1 and are never sampled."""
    missing = [max(0, tile - length) for length in image.shape[1:]]
    if not any(missing):
        return image, label
    widths = [w for m in reversed(missing) for w in (m // 2, m - m // 2)]
    return torch.nn.functional.pad(image, widths), torch.nn.functional.pad(label, widths, value=-1)


def _tile_grid(shape: torch.Size, tile: int, stride: int) -> list[tuple[int, ...]]:
    grid: list[tuple[int, ...]] = [()]
    for length in shape:
        grid = [start + (s,) for start in grid for s in tile_starts(length, tile, stride)]
    return grid


def train_head_on_cached(head: torch.nn.Module, level_channels: Sequence[int], features: torch.Tensor,
                         labels: torch.Tensor, iterations: int, learning_rate: float, batch_voxels: int, seed: int
                         ) -> list[float]:
    """Train a probe head in place on cached voxel features whose channels are `level_channels` per level (Adam,
    cross-entropy); returns the losses."""
    optimizer = torch.optim.Adam(head.parameters(), learning_rate)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    losses = []
    for _ in range(iterations):
        index = torch.randint(len(labels), (batch_voxels,), generator=generator)
        loss = torch.nn.functional.cross_entropy(head_on_voxels(head, features[index], level_channels), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    head.eval()
    return losses
