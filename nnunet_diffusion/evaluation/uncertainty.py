"""Per-voxel uncertainty from N sampled probability maps, written as NIfTI maps that overlay the input image.

Samples are shaped [sample, C, *spatial] with spatial axes in SimpleITK's (z, y, x) array order, which is how
nnU-Net exports probabilities (`.npz` key `probabilities`, shape (C, *sitk_array_shape)); stacking N exports
gives the expected input.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.special import xlogy


def entropy_of_mean(probs: np.ndarray) -> np.ndarray:
    """Entropy (natural log) of the sample-mean class probabilities, per voxel; 0·log 0 counts as 0.

    Meant for softmax probabilities (classes sum to 1): it is the total predictive uncertainty, high where the
    samples agree on an uncertain voxel and where they disagree.
    """
    samples = _check_samples(probs, min_samples=1)
    mean = samples.mean(axis=0, dtype=np.float64)
    return -xlogy(mean, mean).sum(axis=0)


def variance_across_samples(probs: np.ndarray) -> np.ndarray:
    """Per-class variance across samples (population, ddof=0), averaged over classes, per voxel.

    Unlike the entropy this is zero wherever the samples agree, so it isolates the sampling disagreement.
    """
    samples = _check_samples(probs, min_samples=2)
    return samples.var(axis=0, dtype=np.float64).mean(axis=0)


def write_map_like(values: np.ndarray, reference_image: str | Path, out_file: str | Path) -> Path:
    """Write `values` ((z, y, x) array order) as a float32 image with exactly the reference image's geometry.

    Written to a temporary file in the target folder and renamed, so a killed run leaves no half-written map.
    """
    values = np.asarray(values)
    reference = sitk.ReadImage(str(reference_image))
    expected = reference.GetSize()[::-1]
    if values.shape != expected:
        raise ValueError(f"map shape {values.shape} does not match reference image {reference_image} "
                         f"(SimpleITK array shape (z, y, x) = {expected}); pass one value per voxel in (z, y, x) "
                         f"order, as nnU-Net's exported probabilities are")
    if reference.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"reference image {reference_image} has multi-component pixels; use a single-channel image")
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(reference)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if out_file.name.endswith(".nii.gz") else out_file.suffix
    # A unique name rather than tempfile.mkstemp, whose 0600 mode would survive the rename.
    tmp_file = out_file.parent / f".{out_file.name}.tmp-{uuid.uuid4().hex[:12]}{suffix}"
    try:
        sitk.WriteImage(image, str(tmp_file))
        os.replace(tmp_file, out_file)
    except BaseException:
        tmp_file.unlink(missing_ok=True)
        raise
    return out_file


def _check_samples(probs: np.ndarray, min_samples: int) -> np.ndarray:
    samples = np.asarray(probs)
    if samples.ndim < 3:
        raise ValueError(f"probabilities must be shaped [sample, C, *spatial], got shape {samples.shape}")
    if samples.shape[0] < min_samples:
        raise ValueError(f"need at least {min_samples} sample(s) along axis 0, got {samples.shape[0]} "
                         f"(shape {samples.shape} is read as [sample, C, *spatial])")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"probabilities must be floats, got dtype {samples.dtype}")
    if samples.size and (np.isnan(samples).any() or samples.min() < 0 or samples.max() > 1):
        raise ValueError("probabilities must lie in [0, 1] without NaN; pass softmax outputs, not logits")
    return samples
