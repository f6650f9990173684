"""The 3-axis Body Part Regressor (BPR) network: a small 2D CNN scoring slices along each array axis.

A score is an anatomical coordinate along one axis in units of `mm_per_unit` millimetres (100 mm by default,
so scores stay O(1) as network inputs): training asks consecutive equidistant slices to differ by
Δmm / mm_per_unit. Scores are defined up to an additive constant per axis, as in SSBR / bpreg; a weak L2 term
keeps them near zero. `bpr.body_coordinates` turns the scores of a case's whole slices into its coordinates.

Axes are array axes 0, 1, 2 of the data the BPR sees, named axial / coronal / sagittal for (z, y, x) arrays as
SimpleITK returns them. nnU-Net may transpose axes during preprocessing (plans' transpose_forward): a BPR trained
inside nnU-Net follows nnU-Net's array axes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nnunet_diffusion.checkpoints import load_checkpoint

AXIS_NAMES: tuple[str, str, str] = ("axial", "coronal", "sagittal")
INTENSITY_NORMALIZATIONS = ("ct_window", "none")
LEAKY_SLOPE = 0.01
BPR_FILE_FORMAT = "nnunet_diffusion.bpr/1"
DEFAULT_FEATURES_PER_STAGE = (16, 32, 64, 64)


@dataclass(frozen=True)
class BPRConfig:
    """Everything needed to rebuild a BPR and to check it matches the data it is applied to.

    patch_size: (Z, Y, X) patch size of the nnU-Net configuration the BPR was trained with (a record).
    slice_size: every slice is resampled to this size before it is scored, whatever its extent: the BPR reads whole
        slices (the full field of view), as bpreg does, so a score does not depend on where a window was cut.
    intensity_normalization: "ct_window" clips Hounsfield units to `ct_window` and maps them to [-1, 1] (raw CT);
        "none" leaves intensities as they are (data already normalised, e.g. by nnU-Net's CTNormalization).
    spacing: voxel spacing (mm, array order) of the training data, if known.
    plans_identifier / configuration / data_identifier: the nnU-Net plans, configuration and preprocessed data
        (e.g. "nnUNetPlans_3d_fullres") the BPR was trained on, if any, so a user can detect a BPR trained on
        other plans (other spacing, normalisation or axis order).
    """
    patch_size: tuple[int, int, int]
    slice_size: tuple[int, int] = (64, 64)
    intensity_normalization: str = "ct_window"
    ct_window: tuple[float, float] = (-1000.0, 1500.0)
    features_per_stage: tuple[int, ...] = DEFAULT_FEATURES_PER_STAGE
    head_hidden: int = 64
    mm_per_unit: float = 100.0
    spacing: tuple[float, float, float] | None = None
    plans_identifier: str | None = None
    configuration: str | None = None
    data_identifier: str | None = None

    def __post_init__(self):
        if self.intensity_normalization not in INTENSITY_NORMALIZATIONS:
            raise ValueError(f"unknown intensity_normalization {self.intensity_normalization!r}; "
                             f"use one of {INTENSITY_NORMALIZATIONS}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (Z, Y, X), got {self.patch_size}")
        # Tuples survive JSON/pickle round trips as lists; normalise so equal configs compare equal.
        object.__setattr__(self, "patch_size", tuple(int(s) for s in self.patch_size))
        object.__setattr__(self, "slice_size", tuple(int(s) for s in self.slice_size))
        if len(self.slice_size) != 2 or min(self.slice_size) < self.min_size:
            raise ValueError(f"slice_size must be 2 sizes of at least {self.min_size} (the BPR downsamples "
                             f"{len(self.features_per_stage) - 1} times), got {self.slice_size}")
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        object.__setattr__(self, "features_per_stage", tuple(int(f) for f in self.features_per_stage))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))

    @property
    def min_size(self) -> int:
        """Smallest extent per axis: every downsampling stage must keep at least one voxel of real image."""
        return 2 ** (len(self.features_per_stage) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> tuple:
        """The fields that determine the weights' shapes."""
        return self.features_per_stage, self.head_hidden


def normalize_intensities(images: torch.Tensor, config: BPRConfig) -> torch.Tensor:
    """Map raw intensities to the network's input range (see BPRConfig.intensity_normalization)."""
    if config.intensity_normalization == "none":
        return images
    lower, upper = config.ct_window
    return (images.clamp(lower, upper) - lower) / (upper - lower) * 2 - 1


def resized_slices(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) → (N, 1, *size): whole slices brought to the BPR's input size (bilinear, antialiased when
    shrinking), so slices of any extent can be scored and batched together."""
    if tuple(slices.shape[2:]) == tuple(size):
        return slices
    return nn.functional.interpolate(slices, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
    )


def _he_init(module: nn.Module) -> None:
    """He initialisation for LeakyReLU: PyTorch's default shrinks activations ~2.5× per layer, and without
    normalisation layers the pooled features of neighbouring slices would start out indistinguishable."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
        nn.init.zeros_(module.bias)


class BPRModel(nn.Module):
    """Shared 2D trunk + global average pooling + one linear score head per axis.

    No normalisation layers: absolute intensity (air, lung, bone) carries position information that instance or
    batch statistics would remove. The three heads are the rows of one Linear layer, so every parameter takes
    part in every forward pass (required by DistributedDataParallel when a batch holds one axis only).
    """

    def __init__(self, config: BPRConfig):
        super().__init__()
        self.config = config
        stages, in_channels = [], 1
        for index, features in enumerate(config.features_per_stage):
            stages.append(_conv_block(in_channels, features, stride=1 if index == 0 else 2))
            in_channels = features
        self.trunk = nn.Sequential(*stages)
        self.hidden = nn.Sequential(nn.Linear(in_channels, config.head_hidden), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        self.axis_heads = nn.Linear(config.head_hidden, len(AXIS_NAMES))
        self.apply(_he_init)

    def get_extra_state(self) -> dict:
        """The config travels inside every state_dict, so nnU-Net checkpoints of the BPR are self-describing."""
        return {"config": self.config.to_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Adopt the saved config (training metadata such as plans), refusing weights of another architecture."""
        saved = BPRConfig(**state["config"])
        if saved.architecture() != self.config.architecture():
            raise ValueError(f"BPR weights are for features_per_stage/head_hidden {saved.architecture()}, but this "
                             f"network was built with {self.config.architecture()}")
        self.config = saved

    def score_slices(self, slices: torch.Tensor, axis: int) -> torch.Tensor:
        """(N, 1, H, W) slices orthogonal to `axis` → (N,) scores (coordinates along that axis); each slice is
        resampled to `config.slice_size` first (bilinear, antialiased when shrinking)."""
        if slices.ndim != 4 or slices.shape[1] != 1:
            raise ValueError(f"expected slices of shape (N, 1, H, W), got {tuple(slices.shape)}")
        slices = normalize_intensities(resized_slices(slices, self.config.slice_size), self.config)
        features = self.trunk(slices).mean(dim=(2, 3))
        return self.axis_heads(self.hidden(features))[:, axis]

    def forward(self, slices: torch.Tensor, axis: int) -> torch.Tensor:
        """score_slices: what the BPR trainer calls through nnU-Net's (possibly DDP-wrapped) network."""
        return self.score_slices(slices, axis)


def build_bpr(config: BPRConfig, seed: int | None = None) -> BPRModel:
    """A fresh BPR; with a seed its initial weights are reproducible without touching the global RNG."""
    if seed is None:
        return BPRModel(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BPRModel(config)


def save_bpr(model: BPRModel, path: str | Path) -> None:
    """Store weights (moved to CPU) and config; loadable with load_bpr on any machine."""
    state = {name: value.detach().cpu() if torch.is_tensor(value) else value
             for name, value in model.state_dict().items()}
    torch.save({"format": BPR_FILE_FORMAT, "config": model.config.to_dict(), "state_dict": state}, str(path))


def load_bpr(path: str | Path, map_location: str | torch.device = "cpu") -> BPRModel:
    """Rebuild a BPR saved with save_bpr; map_location lets a GPU-saved file load on a CPU-only machine."""
    checkpoint = load_checkpoint(path, map_location=map_location)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != BPR_FILE_FORMAT:
        raise ValueError(f"{path} is not a BPR file written by save_bpr (for an nnU-Net checkpoint of "
                         "nnUNetTrainerBPR use load_bpr_from_nnunet_checkpoint)")
    model = BPRModel(BPRConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.to(map_location)
    return model.eval()


def load_bpr_from_nnunet_checkpoint(path: str | Path) -> BPRModel:
    """The BPR from an nnUNetTrainerBPR checkpoint (checkpoint_final.pth / checkpoint_best.pth), on the CPU.

    The BPR's config (patch size, plans, configuration, ...) is stored inside the network weights, so neither
    the trainer class nor the plans are needed.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    weights = checkpoint.get("network_weights", {}) if isinstance(checkpoint, dict) else {}
    if "_extra_state" not in weights:
        trainer = checkpoint.get("trainer_name") if isinstance(checkpoint, dict) else None
        raise ValueError(f"{path} is not an nnUNetTrainerBPR checkpoint (trainer: {trainer!r}); train the BPR with "
                         "`nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerBPR`")
    model = BPRModel(BPRConfig(**weights["_extra_state"]["config"]))
    model.load_state_dict(weights)
    return model.eval()
