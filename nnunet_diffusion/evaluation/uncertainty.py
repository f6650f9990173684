"""Per-voxel uncertainty from N sampled probability maps, written as NIfTI maps that overlay the input image, and
`predict_uncertainty`, which samples them with nnU-Net's predictor (the library behind `nnunet-diffusion
uncertainty`).

Samples are shaped [sample, C, *spatial] with spatial axes in SimpleITK's (z, y, x) array order, which is how
nnU-Net exports probabilities (`.npz` key `probabilities`, shape (C, *sitk_array_shape)); stacking N exports
gives the expected input.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from scipy.special import xlogy

from nnunet_diffusion.evaluation.model_folders import find_cases, read_model_folder
from nnunet_diffusion.evaluation.step_prediction import (diffusion_network, export, load_predictor, preprocess,
                                                        read_probabilities)


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


MEASURES = {"entropy": entropy_of_mean, "variance": variance_across_samples}


def predict_uncertainty(model_folder: str | Path, images: str | Path, output: str | Path, seeds: Sequence[int],
                        measure: str = "entropy", folds: Sequence[int | str] = (0,),
                        checkpoint: str = "checkpoint_final.pth", device: str = "cuda", use_mirroring: bool = True,
                        sampler: str | None = None, steps: int | None = None, keep_samples: bool = False,
                        save_probabilities: bool = False) -> list[Path]:
    """Write the mean segmentation and the uncertainty map of every case; returns the maps.

    `sampler` and `steps` left at None keep whatever nnUNet_diffusion_sampler/steps say (as for
    nnUNetv2_predict). Samples go to `<output>/samples/seed_<s>/` when kept, else to a temporary folder.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose {' or '.join(MEASURES)}")
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError(f"need at least 2 distinct seeds (one sample each), got {list(seeds)}")
    model = read_model_folder(model_folder, folds, checkpoint)
    predictor = load_predictor(model, folds, checkpoint, torch.device(device), use_mirroring)
    network = diffusion_network(predictor)
    if network is None:
        raise ValueError(f"{model.path} was trained with {model.trainer}, not a diffusion trainer: its predictions "
                         f"do not depend on the seed, so samples would all be equal")
    if measure == "entropy" and predictor.label_manager.has_regions:
        raise ValueError(f"{model.path} predicts overlapping regions (sigmoid per region), for which the entropy over "
                         f"classes is undefined; use --measure variance")
    reader_writer = predictor.plans_manager.image_reader_writer_class
    if not issubclass(reader_writer, SimpleITKIO):
        raise ValueError(f"{model.path} reads images with {reader_writer.__name__}; uncertainty maps are written in "
                         f"SimpleITK's array order and need a SimpleITKIO model")
    ending = model.dataset_json["file_ending"]
    cases = find_cases(images, ending, len(model.dataset_json["channel_names"]))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    chosen = network.prediction_settings()
    chosen = replace(chosen, **{k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None})
    maps = []
    with tempfile.TemporaryDirectory(prefix="nnunet_diffusion_samples_") as scratch:
        samples = output / "samples" if keep_samples else Path(scratch)
        for i, case in enumerate(cases, 1):
            data, properties = preprocess(predictor, case)
            probability_files = []
            for j, seed in enumerate(seeds, 1):
                print(f"case {i}/{len(cases)} {case.name}: sample {j}/{len(seeds)} (seed {seed})", flush=True)
                with network.sampling_with(replace(chosen, seed=seed)):
                    logits = predictor.predict_logits_from_preprocessed_data(data)
                truncated = samples / f"seed_{seed}" / case.name
                export(predictor, logits, properties, truncated, save_probabilities=True)
                probability_files.append(truncated.with_name(case.name + ".npz"))
            merge_files([str(f) for f in probability_files], str(output / case.name), ending, reader_writer(),
                        predictor.label_manager, save_probabilities)
            values = MEASURES[measure](np.stack([read_probabilities(f) for f in probability_files]))
            maps.append(write_map_like(values, case.images[0], output / f"{case.name}_{measure}{ending}"))
    return maps
