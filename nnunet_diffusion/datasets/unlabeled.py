"""Turn a folder of unlabeled images into an nnU-Net v2 raw dataset, so nnU-Net can plan, preprocess and train
the self-supervised trainers (BPR, diffusion pretraining) on it.

Labels: nnU-Net needs a label file per training case, and all-zero label files pass
`nnUNetv2_plan_and_preprocess --verify_dataset_integrity`, but the fingerprint extraction that follows then crashes
(`IndexError` in `np.percentile`): it collects the intensity statistics used for CT normalisation (clip
percentiles, mean, std) from voxels with label > 0 only, and there are none (checked with nnunetv2 2.8.1).
So each label file here is a rough **body mask** (label 1, "foreground"): voxels above -500 HU for CT channels
(above the Otsu threshold for any other channel), with holes filled slice by slice (lungs, bowel gas). nnU-Net
then normalises CT with statistics of the body, and its foreground oversampling picks patches inside the body.
The self-supervised trainers ignore the labels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_fill_holes

from nnunet_diffusion.datasets.staging import (add_raw_root_argument, check_dataset_name, raw_root_argument,
                                               staged_dataset)

IMAGE_FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
CT_BODY_THRESHOLD_HU = -500.0
UNLABELED_LABELS = {"background": 0, "foreground": 1}


def _file_ending(path: Path) -> str | None:
    return next((ending for ending in IMAGE_FILE_ENDINGS if path.name.lower().endswith(ending)), None)


def _case_identifier(path: Path, ending: str) -> str:
    """File name without its ending and without a trailing nnU-Net channel suffix '_0000'."""
    stem = path.name[:-len(ending)]
    return stem[:-len("_0000")] if stem.endswith("_0000") else stem


def _list_images(image_folder: Path) -> tuple[list[Path], str]:
    """The image files (sorted) and their common ending; other files are ignored."""
    if not image_folder.is_dir():
        raise NotADirectoryError(f"image folder {image_folder} does not exist or is not a folder")
    images = sorted(p for p in image_folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and _file_ending(p) is not None)
    if not images:
        raise ValueError(f"no images in {image_folder}: expected files ending in {', '.join(IMAGE_FILE_ENDINGS)}")
    endings = sorted({_file_ending(p) for p in images})
    if len(endings) > 1:
        raise ValueError(f"{image_folder} mixes file endings {endings}; nnU-Net needs one file ending per dataset, "
                         "so convert the images to one format first (e.g. with SimpleITK)")
    return images, endings[0]


def _read_scalar_volume(path: Path) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"cannot read image {path}: {str(error).strip().splitlines()[-1]}") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} is a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                         "component(s) per voxel; only single-channel 3D images are supported")
    return image


def body_mask(image: sitk.Image, channel_name: str) -> np.ndarray:
    """Rough body mask, (z, y, x) uint8: thresholded (fixed HU for CT, Otsu otherwise), holes filled per slice."""
    array = sitk.GetArrayViewFromImage(image)
    if channel_name.lower() == "ct":
        threshold = CT_BODY_THRESHOLD_HU
    else:
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.Execute(sitk.Cast(image, sitk.sitkFloat32))
        threshold = otsu.GetThreshold()
    mask = array > threshold
    return np.stack([binary_fill_holes(axial) for axial in mask]).astype(np.uint8)


def images_to_dataset(image_folder: str | Path, raw_root: str | Path, dataset_id: int, name: str,
                      channel_name: str = "CT", overwrite: bool = False) -> Path:
    """Write Dataset{id}_{name} with imagesTr/<case>_0000<ending> and body-mask labelsTr; returns its folder.

    `.nii` input is written as `.nii.gz` so images and labels go through nnU-Net's SimpleITK reader; the other
    formats keep their ending. The dataset is built in a temporary folder and renamed when complete.
    """
    check_dataset_name(name)
    image_folder, raw_root = Path(image_folder), Path(raw_root)
    images, ending = _list_images(image_folder)
    output_ending = ".nii.gz" if ending == ".nii" else ending
    identifiers = [_case_identifier(p, ending) for p in images]
    duplicates = sorted({i for i in identifiers if identifiers.count(i) > 1})
    if duplicates:
        raise ValueError(f"several files in {image_folder} map to the same case name(s) {duplicates} "
                         "(a trailing '_0000' is dropped); rename them")

    raw_root.mkdir(parents=True, exist_ok=True)
    target = raw_root / f"Dataset{dataset_id:03d}_{name}"
    with staged_dataset(target, dataset_id, overwrite) as staging:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        foreground_voxels = 0
        for path, case in zip(images, identifiers):
            image = _read_scalar_volume(path)
            mask = body_mask(image, channel_name)
            foreground_voxels += int(mask.sum())
            labels = sitk.GetImageFromArray(mask)
            labels.CopyInformation(image)
            sitk.WriteImage(image, str(staging / "imagesTr" / f"{case}_0000{output_ending}"), useCompression=True)
            sitk.WriteImage(labels, str(staging / "labelsTr" / f"{case}{output_ending}"), useCompression=True)
        if foreground_voxels == 0:
            raise ValueError(f"the body mask is empty in every image of {image_folder}: nnU-Net's fingerprint needs "
                             "foreground voxels. Check channel_name (CT expects Hounsfield units)")
        dataset_json = {
            "name": name,
            "description": f"Unlabeled images from {image_folder.resolve()}; labels are rough body masks "
                           "(nnunet_diffusion.datasets.unlabeled)",
            "channel_names": {"0": channel_name},
            "labels": UNLABELED_LABELS,
            "numTraining": len(images),
            "file_ending": output_ending,
        }
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return target


def main(argv: list[str] | None = None) -> int:
    """`nnunet-diffusion images-to-dataset`: unlabeled image folder → nnU-Net raw dataset."""
    parser = argparse.ArgumentParser(prog="nnunet-diffusion images-to-dataset",
                                     description="Turn a folder of unlabeled 3D images into an nnU-Net raw dataset "
                                                 "(labels are rough body masks) for self-supervised pretraining.")
    parser.add_argument("image_folder", help=f"folder with images ({', '.join(IMAGE_FILE_ENDINGS)})")
    parser.add_argument("--dataset-id", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--channel-name", default="CT",
                        help="nnU-Net channel name; 'CT' selects nnU-Net's CT normalisation (default: CT)")
    add_raw_root_argument(parser)
    parser.add_argument("--force", action="store_true", help="replace an existing dataset folder of the same name")
    args = parser.parse_args(argv)
    raw_root = raw_root_argument(parser, args)
    try:
        folder = images_to_dataset(args.image_folder, raw_root, args.dataset_id, args.name, args.channel_name,
                                   overwrite=args.force)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(folder)
    return 0
