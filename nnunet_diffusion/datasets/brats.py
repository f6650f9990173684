"""Convert the DeepMedic copy of BraTS 2013 (FLAIR + T1c, brain mask, 5-class labels) into an nnU-Net v2 raw dataset.

Source layout (one folder per case, e.g. brats_2013_pat0003_1/): Flair_subtrMeanDivStd.nii.gz,
T1c_subtrMeanDivStd.nii.gz (both z-scored inside the brain by the provider), brainmask.nii.gz and
OTMultiClass.nii.gz (0 background, 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing). The data are
CC BY-NC-SA 3.0 CH (see License_CC_BY_NC_SA_3.0.txt in each case folder): they are converted into `nnUNet_raw`,
never into this repository.

Each case is cropped to its brain mask's bounding box and resampled to `spacing_mm` isotropic (linear for
images, nearest neighbour for labels) so that the small diffusion experiments fit in memory and time.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunet_diffusion.datasets.staging import staged_dataset
from nnunet_diffusion.utils import geometry_mismatch

CHANNEL_FILES = ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz")  # _0000, _0001
BRAIN_MASK_FILE = "brainmask.nii.gz"
LABEL_FILE = "OTMultiClass.nii.gz"
SOURCE_FILES = (*CHANNEL_FILES, BRAIN_MASK_FILE, LABEL_FILE)
FILE_ENDING = ".nii.gz"

# Look-up tables: index = source label (0 background, 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing),
# value = nnU-Net label.
SUBREGION_LUT = np.array([0, 2, 1, 2, 3], dtype=np.uint8)
SUBREGION_LABELS = {"background": 0, "oedema": 1, "core": 2, "enhancing": 3}
WHOLE_TUMOUR_LUT = np.array([0, 1, 1, 1, 1], dtype=np.uint8)
WHOLE_TUMOUR_LABELS = {"background": 0, "tumour": 1}
# Both channels were z-scored inside the brain mask by the provider and we keep that: nnU-Net's "zscore" would
# renormalise over the whole crop, because the background holds a constant non-zero value (the z-score of 0) and
# so nnU-Net's nonzero mask covers everything; the statistics would then depend on how much background each box
# holds. "noNorm" (nnU-Net's NoNormalization) passes the provider's brain-masked z-scores through unchanged.
CHANNEL_NAMES = {"0": "noNorm", "1": "noNorm"}


def convert_brats(source_dir: str | Path, raw_root: str | Path | None, dataset_id: int = 501,
                  spacing_mm: float = 2.0, whole_tumour: bool = False) -> Path:
    """Write Dataset{id}_BraTS2013[WT] under `raw_root` and return its path.

    Labels: background 0, oedema 1, core (necrosis + non-enhancing) 2, enhancing 3; with `whole_tumour` a single
    label tumour 1. All cases go to imagesTr/labelsTr (folds are the user's choice). Written through
    `staged_dataset`: a failed or killed run leaves no half-written dataset.
    """
    if raw_root is None or str(raw_root) == "":
        raise ValueError("raw_root is not set: pass --raw-root or set the nnUNet_raw environment variable")
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be in 1..999 (nnU-Net uses three digits), got {dataset_id}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    source_dir, raw_root = Path(source_dir), Path(raw_root)
    _refuse_repository_target(raw_root)
    cases = _find_cases(source_dir)

    lut, labels = (WHOLE_TUMOUR_LUT, WHOLE_TUMOUR_LABELS) if whole_tumour else (SUBREGION_LUT, SUBREGION_LABELS)
    name = f"Dataset{dataset_id:03d}_BraTS2013{'WT' if whole_tumour else ''}"
    raw_root.mkdir(parents=True, exist_ok=True)
    clashes = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*"))
    if clashes:
        raise FileExistsError(f"{raw_root} already holds {', '.join(clashes)} with dataset id {dataset_id}; "
                              f"delete it or pick another --dataset-id")
    target = raw_root / name
    with staged_dataset(target, dataset_id, overwrite=False) as staging:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        for case in cases:
            _convert_case(case, staging, lut, spacing_mm)
        generate_dataset_json(
            str(staging), channel_names=CHANNEL_NAMES, labels=labels, num_training_cases=len(cases),
            file_ending=FILE_ENDING, dataset_name=name,
            description=(f"BraTS 2013 (DeepMedic copy): channel 0 FLAIR, channel 1 T1c, both z-scored inside the "
                         f"brain by the provider; cropped to the brain mask and resampled to {spacing_mm} mm."),
            reference="Menze et al., IEEE TMI 34(10), 2015; data prepared by K. Kamnitsas for DeepMedic",
            license="CC BY-NC-SA 3.0 CH", converted_by="nnunet-diffusion convert-brats")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line entry (`nnunet-diffusion convert-brats`); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="nnunet-diffusion convert-brats",
        description="Convert the DeepMedic BraTS 2013 cases into an nnU-Net v2 raw dataset.")
    parser.add_argument("source_dir", type=Path, help="folder with one sub-folder per case (brats_2013_pat*)")
    parser.add_argument("--raw-root", type=Path, default=os.environ.get("nnUNet_raw") or None,
                        help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    parser.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (default: 501)")
    parser.add_argument("--spacing", type=float, default=2.0, help="isotropic target spacing in mm (default: 2)")
    parser.add_argument("--whole-tumour", action="store_true",
                        help="one label 'tumour' instead of oedema / core / enhancing")
    args = parser.parse_args(argv)
    try:
        target = convert_brats(args.source_dir, args.raw_root, args.dataset_id, args.spacing, args.whole_tumour)
    except (ValueError, OSError) as error:
        print(f"convert-brats: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    return 0


def _find_cases(source_dir: Path) -> list[Path]:
    """Case folders, checked for completeness before anything is written."""
    if not source_dir.is_dir():
        raise FileNotFoundError(f"BraTS source folder {source_dir} does not exist; pass the folder that holds the "
                                f"brats_2013_pat* case folders")
    cases = sorted(p for p in source_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise FileNotFoundError(f"no case folders in {source_dir}; expected one sub-folder per case")
    missing = [str(case / f) for case in cases for f in SOURCE_FILES if not (case / f).is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete BraTS cases, missing: {', '.join(missing)}")
    return cases


def _refuse_repository_target(raw_root: Path) -> None:
    """The data are licensed non-commercially and large: never write them inside this git repository."""
    repository = Path(__file__).resolve().parents[2]
    if (repository / ".git").exists() and raw_root.resolve().is_relative_to(repository):
        raise ValueError(f"raw_root {raw_root} lies inside the repository {repository}; write the dataset to "
                         f"nnUNet_raw outside it")


def _convert_case(case: Path, out: Path, lut: np.ndarray, spacing_mm: float) -> None:
    images = [sitk.ReadImage(str(case / f), sitk.sitkFloat32) for f in CHANNEL_FILES]
    brain = sitk.ReadImage(str(case / BRAIN_MASK_FILE))
    label = sitk.ReadImage(str(case / LABEL_FILE))
    for file, image in zip(SOURCE_FILES[1:], (*images[1:], brain, label)):
        mismatch = geometry_mismatch(image, images[0])
        if mismatch:
            raise ValueError(f"{case / file} does not have the geometry of {case / CHANNEL_FILES[0]} ({mismatch})")

    brain_mask = sitk.GetArrayFromImage(brain) > 0
    if not brain_mask.any():
        raise ValueError(f"brain mask {case / BRAIN_MASK_FILE} is empty")
    source_labels = sitk.GetArrayFromImage(label)
    valid = np.isin(source_labels, np.arange(len(lut)))
    if not valid.all():
        raise ValueError(f"{case / LABEL_FILE} holds values {np.unique(source_labels[~valid])[:5]} outside the "
                         f"BraTS labels 0..{len(lut) - 1}")
    mapped = sitk.GetImageFromArray(lut[source_labels.astype(np.intp)])
    mapped.CopyInformation(label)

    coords = np.argwhere(brain_mask)
    lo, hi = coords.min(0)[::-1], coords.max(0)[::-1] + 1  # array (z, y, x) → image (x, y, z)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    for channel, image in enumerate(images):
        resampled = _resample(image[box], spacing_mm, sitk.sitkLinear)
        sitk.WriteImage(resampled, str(out / "imagesTr" / f"{case.name}_{channel:04d}{FILE_ENDING}"))
    resampled = _resample(mapped[box], spacing_mm, sitk.sitkNearestNeighbor)
    sitk.WriteImage(resampled, str(out / "labelsTr" / f"{case.name}{FILE_ENDING}"))


def _resample(image: sitk.Image, spacing_mm: float, interpolator: int) -> sitk.Image:
    """Resample onto an isotropic grid covering the same physical extent (voxel edges kept, not centres)."""
    dim = image.GetDimension()
    in_spacing = np.asarray(image.GetSpacing())
    out_spacing = np.full(dim, float(spacing_mm))
    size = np.maximum(1, np.floor(np.asarray(image.GetSize()) * in_spacing / out_spacing + 0.5)).astype(int)
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    origin = np.asarray(image.GetOrigin()) + direction @ ((out_spacing - in_spacing) / 2)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in size])
    resampler.SetOutputSpacing(out_spacing.tolist())
    resampler.SetOutputOrigin(origin.tolist())
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(interpolator)
    resampler.SetOutputPixelType(image.GetPixelID())
    # Rounding the size up can put the last sample centre just past the outermost voxel centre; extrapolate
    # from the nearest voxel there instead of padding with an arbitrary value.
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(image)
