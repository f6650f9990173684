"""Per-voxel anatomical coordinates that survive normalisation: a SPADE-style modulation after every norm layer.

Coordinates given to a conv + InstanceNorm stack as input channels are removed where it matters: a constant offset
of the coordinate map (a case lying 10 cm higher) shifts each first-layer output channel by a constant, which the
per-tile normalisation subtracts again, except where zero padding at the tile border breaks the constant; what
reaches the features is a border artefact, not a position. Here every
normalisation layer is followed by a per-voxel scale and shift computed linearly from the coordinates at that
layer's resolution: y = norm(x) · (1 + γ(c)) + β(c). The modulation comes after the statistics, so absolute
position reaches every stage, and it depends on the voxel's own coordinates only, not on the tile it is seen in.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from nnunet_diffusion.core.time_conditioning import FiLMNorm, norm_channels

COORDINATE_CHANNELS = 3  # the last three image channels of a dataset written by `nnunet-diffusion add-coordinates`
COORDINATES_KEY = "coordinate_channels"  # its dataset.json entry
COORDINATE_CHANNEL_NAME = "noNorm"  # its channel names: nnU-Net leaves their values as they are
COORDINATE_INIT_STD = 0.1  # the modulation's start: features carry position, normalised activations dominate


class CoordinateContext:
    """The coordinate map (B, 3, *spatial) of the current forward pass, resampled once per resolution for the
    layers sharing it (deliberately not a Module)."""

    def __init__(self) -> None:
        self.coordinates: torch.Tensor | None = None
        self._by_shape: dict[tuple[int, ...], torch.Tensor] = {}

    def at(self, spatial: tuple[int, ...]) -> torch.Tensor:
        if self.coordinates is None:
            raise RuntimeError("a coordinate-conditioned layer was called without coordinates; call the backbone, "
                               "not its inner UNet")
        if spatial not in self._by_shape:
            self._by_shape[spatial] = self.coordinates if tuple(self.coordinates.shape[2:]) == spatial else \
                nn.functional.interpolate(self.coordinates, size=spatial, mode="area")
        return self._by_shape[spatial]


@contextmanager
def conditioned_on_coordinates(context: CoordinateContext, coordinates: torch.Tensor) -> Iterator[None]:
    """Let the layers sharing `context` read `coordinates` for the calls inside the block, and only there."""
    context.coordinates, context._by_shape = coordinates, {}
    try:
        yield
    finally:
        context.coordinates, context._by_shape = None, {}


class CoordinateNorm(nn.Module):
    """A normalisation layer (or a FiLM-wrapped one) followed by a per-voxel scale and shift linear in the
    coordinates. The projection starts small and random (`init_std`), so that even an untrained network's
    features carry position (the random-init control), without dominating the normalised activations."""

    def __init__(self, norm: nn.Module, num_channels: int, context: CoordinateContext, init_std: float):
        super().__init__()
        self.norm = norm
        self.to_scale_shift = nn.Linear(COORDINATE_CHANNELS, 2 * num_channels)
        nn.init.normal_(self.to_scale_shift.weight, std=init_std)
        nn.init.zeros_(self.to_scale_shift.bias)
        self._context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coordinates = self._context.at(tuple(x.shape[2:])).to(x.dtype)
        scale, shift = self.to_scale_shift(coordinates.movedim(1, -1)).movedim(-1, 1).chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


def add_coordinate_modulation(network: nn.Module, context: CoordinateContext, init_std: float) -> int:
    """Wrap every normalisation layer (plain or FiLM-wrapped) of `network` in CoordinateNorm, in place; returns
    how many were wrapped."""
    wrappers: dict[int, CoordinateNorm] = {}  # a norm can have two parents (e.g. `.norm` and `.all_modules[i]`)
    for parent in list(network.modules()):
        if isinstance(parent, (CoordinateNorm, FiLMNorm)):
            continue
        for name, child in list(parent.named_children()):
            channels = norm_channels(child.norm if isinstance(child, FiLMNorm) else child)
            if channels is not None:
                if id(child) not in wrappers:
                    wrappers[id(child)] = CoordinateNorm(child, channels, context, init_std)
                setattr(parent, name, wrappers[id(child)])
    if not wrappers:
        raise ValueError(f"{type(network).__name__} has no normalisation layer to modulate with coordinates")
    return len(wrappers)


def coordinate_channel_problem(dataset_json: dict, reads_coordinates: bool, trainer_name: str) -> str | None:
    """What is wrong with a dataset for a trainer that does (or does not) read coordinate channels, or None."""
    entry = dataset_json.get(COORDINATES_KEY)
    channels = len(dataset_json.get("channel_names", {}))
    if reads_coordinates and entry is None:
        return (f"{trainer_name} reads anatomical coordinates from the dataset's last {COORDINATE_CHANNELS} channels, "
                f"and this dataset has none: add them with `nnunet-diffusion add-coordinates` (a BPR or the image "
                f"geometry), plan and preprocess the new dataset, and train on it")
    if entry is not None and not reads_coordinates:
        return (f"the dataset's last {COORDINATE_CHANNELS} channels are anatomical coordinates, which "
                f"{trainer_name} would treat as image channels: use its coordinate variant (…Coord)")
    if entry is not None and list(entry.get("channels", [])) != list(range(channels - COORDINATE_CHANNELS, channels)):
        return (f"dataset.json's {COORDINATES_KEY} names channels {entry.get('channels')}, but coordinates must be "
                f"the last {COORDINATE_CHANNELS} of the {channels}: rewrite the dataset with `nnunet-diffusion "
                f"add-coordinates`")
    return None
