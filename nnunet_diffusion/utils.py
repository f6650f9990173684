"""Small helpers every layer may use: NaN-aware means, Markdown tables, temporary environment variables, image
geometry checks, nnU-Net's model folder names."""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Headers written by different tools differ in the last float digits; anything beyond this (mm, or direction
# cosines) is a real geometry difference.
GEOMETRY_TOLERANCE = 1e-4


def nanmean(values: Sequence[float]) -> float:
    """numpy's mean ignoring NaN, without its warning when every value is NaN: a label absent from a case is
    routine in these tables, not a fault to report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.asarray(values, dtype=float)))


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table (no trailing newline); cells are written with str()."""
    lines = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def geometry_mismatch(image: sitk.Image, reference: sitk.Image) -> str:
    """Which of size, spacing, origin and direction differ beyond the tolerance (empty string when none does)."""
    if image.GetSize() != reference.GetSize():
        return f"size {image.GetSize()} vs {reference.GetSize()}"
    for name in ("Spacing", "Origin", "Direction"):
        a, b = getattr(image, f"Get{name}")(), getattr(reference, f"Get{name}")()
        if not np.allclose(a, b, rtol=0, atol=GEOMETRY_TOLERANCE):
            return f"{name.lower()} {tuple(round(v, 6) for v in a)} vs {tuple(round(v, 6) for v in b)}"
    return ""


def model_folder(results: str | Path, dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """nnU-Net's output folder of one trainer, plans and configuration under any results root, named by nnU-Net's
    own `convert_trainer_plans_config_to_identifier`. (Its `get_output_folder` always uses $nnUNet_results, so it
    cannot point at other roots, such as an experiment's per-repeat ones.)"""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
    return Path(results) / dataset / convert_trainer_plans_config_to_identifier(trainer, plans, configuration)


@dataclass(frozen=True)
class TrainingBudget:
    """nnU-Net's loop lengths: epochs × iterations per epoch, and validation batches per epoch."""
    epochs: int
    iterations: int
    val_iterations: int = 1

    def __post_init__(self):
        if min(self.epochs, self.iterations, self.val_iterations) < 1:
            raise ValueError(f"epochs, iterations and validation iterations must be at least 1, got {self}")
