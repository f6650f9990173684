"""Point-wise probe heads on multi-scale decoder features (vox2vec-style linear and non-linear probes).

A head sees the outputs of every decoder stage of the frozen backbone, each upsampled (linear interpolation) to
the input resolution and concatenated. Its first layer is a 1×1(×1) convolution on that concatenation; because a
1×1 convolution and linear interpolation commute (interpolation weights sum to 1, so even the bias does), it is
computed per level, each level upsampled before or after its projection, whichever has fewer channels; the
full-resolution concatenation is never materialised.

All parameters live under a `seg_layers` attribute, so that inside a probe network (`head.seg_layers.*`)
nnU-Net's `load_pretrained_weights` treats them as the new, randomly initialised segmentation layers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INTERPOLATION_MODES = {2: "bilinear", 3: "trilinear"}


def conv_1x1(ndim: int, in_channels: int, out_channels: int, bias: bool = True) -> nn.Module:
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    return conv(in_channels, out_channels, kernel_size=1, bias=bias)


def upsample(features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(features.shape[2:]) == tuple(size):
        return features
    return F.interpolate(features, size=tuple(size), mode=INTERPOLATION_MODES[features.ndim - 2], align_corners=False)


def concatenated_levels(levels: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """The levels upsampled to `size` and concatenated: the per-voxel features a head reads (for caching them)."""
    return torch.cat([upsample(level, size) for level in levels], dim=1)


def head_on_voxels(head: nn.Module, voxel_features: torch.Tensor, level_channels: Sequence[int]) -> torch.Tensor:
    """Logits (N, classes) of a probe head for N voxels' concatenated features (N, sum(level_channels)).

    The voxels are laid out as a (1, channels, N, 1, …) volume, so the head's 1×1 convolutions apply unchanged and
    the same head can be trained on cached features of a frozen backbone, then used inside the probe network.
    """
    ndim = next(head.parameters()).ndim - 2
    volume = voxel_features.T.reshape(1, voxel_features.shape[1], len(voxel_features), *([1] * (ndim - 1)))
    logits = head(torch.split(volume, list(level_channels), dim=1), volume.shape[2:])
    return logits.reshape(logits.shape[1], -1).T


class MultiScaleProjection(nn.Module):
    """1×1 convolution of the upsampled, concatenated levels, computed per level (one bias for all levels)."""

    def __init__(self, level_channels: Sequence[int], out_channels: int, ndim: int):
        super().__init__()
        self.level_convs = nn.ModuleList(conv_1x1(ndim, channels, out_channels, bias=index == 0)
                                         for index, channels in enumerate(level_channels))

    def forward(self, levels: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        if len(levels) != len(self.level_convs):
            raise ValueError(f"expected {len(self.level_convs)} feature levels, got {len(levels)}")
        return sum(self._project(conv, level, size) for conv, level in zip(self.level_convs, levels))

    @staticmethod
    def _project(conv: nn.Module, level: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Upsample whichever is narrower, the level or its projection: the two orders give the same result."""
        if level.shape[1] < conv.out_channels:
            return conv(upsample(level, size))
        return upsample(conv(level), size)


class LinearProbeHead(nn.Module):
    """A linear classifier per voxel on the concatenated multi-scale features."""

    def __init__(self, level_channels: Sequence[int], num_classes: int, ndim: int):
        super().__init__()
        self.seg_layers = MultiScaleProjection(level_channels, num_classes, ndim)

    def forward(self, levels: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        return self.seg_layers(levels, size)


class NonLinearProbeHead(nn.Module):
    """A per-voxel MLP (1×1 convolutions with LeakyReLU) on the concatenated multi-scale features."""

    def __init__(self, level_channels: Sequence[int], num_classes: int, ndim: int,
                 hidden_channels: Sequence[int] = (128, 32)):
        super().__init__()
        layers: list[nn.Module] = []
        for in_channels, out_channels in zip(hidden_channels, [*hidden_channels[1:], num_classes]):
            layers += [nn.LeakyReLU(0.01), conv_1x1(ndim, in_channels, out_channels)]
        self.seg_layers = nn.ModuleDict({
            "projection": MultiScaleProjection(level_channels, hidden_channels[0], ndim),
            "mlp": nn.Sequential(*layers),
        })

    def forward(self, levels: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        return self.seg_layers["mlp"](self.seg_layers["projection"](levels, size))
