"""Anatomical coordinates as extra image channels of an nnU-Net raw dataset: `nnunet-diffusion add-coordinates`.

Every voxel gets three coordinates (along the array axes z, y, x of the raw image, in units of 100 mm), written as
three more channels named `noNorm` in dataset.json, so nnU-Net leaves their values as they are while it crops,
resamples and augments them spatially together with the image, and its predictor reads them like any channel.
New images get the same command before `nnUNetv2_predict`.

Sources:
- `BPRCoordinates`: a trained Body Part Regressor (an `nnUNetTrainerBPR` checkpoint). Each case is preprocessed
  with the BPR's own plans (nnU-Net's `DefaultPreprocessor`, as its predictor does), every whole slice along each
  axis is scored, and the case's coordinate along that axis is the Theil–Sen line through the scores
  (`bpr.body_coordinates`), evaluated at every raw voxel's position. One line per case and axis: no patch or tile
  offsets.
- `GeometryCoordinates`: the image geometry (origin, spacing, direction): the voxel's physical position along
  each array axis. For the phantom, whose origin is the true torso position, these are the true coordinates
  (the ceiling a BPR is measured against); for real scans they depend on the scanner's table position.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_diffusion.bpr.body_coordinates import axis_maps
from nnunet_diffusion.pretraining.coordinate_modulation import (COORDINATE_CHANNEL_NAME, COORDINATE_CHANNELS,
                                                                COORDINATES_KEY)
from nnunet_diffusion.datasets.staging import (add_raw_root_argument, check_dataset_name, raw_root_argument,
                                               staged_dataset)

MM_PER_UNIT = 100.0


class GeometryCoordinates:
    """Each voxel's physical position (mm / 100) along each array axis, from the image's own geometry."""
    name = "geometry"

    def record(self) -> dict:
        return {"source": self.name}

    def __call__(self, image_files: Sequence[Path]) -> np.ndarray:
        image = sitk.ReadImage(str(image_files[0]))
        origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
        direction = np.array(image.GetDirection()).reshape(3, 3)
        size = image.GetSize()
        positions = []
        for array_axis in range(3):
            itk_axis = 2 - array_axis  # arrays are (z, y, x), SimpleITK's axes (x, y, z)
            start = float(origin @ direction[:, itk_axis])
            positions.append((start + np.arange(size[itk_axis]) * spacing[itk_axis]) / MM_PER_UNIT)
        return axis_maps(positions)


class BPRCoordinates:
    """Whole-slice BPR coordinates of a case, preprocessed as the BPR's training data was."""
    name = "bpr"

    def __init__(self, checkpoint: Path):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_diffusion.bpr.model import load_bpr_from_nnunet_checkpoint
        from nnunet_diffusion.checkpoints import load_checkpoint
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint} is not a file; name the checkpoint_final.pth of an "
                                    f"nnUNetTrainerBPR training")
        self.model = load_bpr_from_nnunet_checkpoint(self.checkpoint)
        init_args = load_checkpoint(self.checkpoint, map_location="cpu")["init_args"]
        self.plans_manager = PlansManager(init_args["plans"])
        self.configuration_manager = self.plans_manager.get_configuration(init_args["configuration"])
        self.dataset_json = init_args["dataset_json"]

    def record(self) -> dict:
        return {"source": self.name, "bpr": str(self.checkpoint.resolve())}

    def __call__(self, image_files: Sequence[Path]) -> np.ndarray:
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        from nnunet_diffusion.bpr.body_coordinates import case_lines
        data, _, properties = DefaultPreprocessor(verbose=False).run_case(
            [str(image_files[0])], None, self.plans_manager, self.configuration_manager, self.dataset_json)
        transpose = list(self.plans_manager.transpose_forward)
        raw_spacing = [properties["spacing"][i] for i in transpose]  # in the preprocessed (transposed) axis order
        cropped = properties["shape_after_cropping_and_before_resampling"]
        # the raw position (mm from the first raw voxel) of every preprocessed slice, per preprocessed axis
        positions = [(properties["bbox_used_for_cropping"][a][0]
                      + (np.arange(data.shape[1 + a]) + 0.5) * cropped[a] / data.shape[1 + a] - 0.5) * raw_spacing[a]
                     for a in range(3)]
        lines = case_lines(self.model, data[0], positions)
        raw_shape = properties["shape_before_cropping"]  # transposed
        by_raw_axis = [None] * 3
        for a, raw_axis in enumerate(transpose):
            by_raw_axis[raw_axis] = lines[a].at(np.arange(raw_shape[a]) * raw_spacing[a])
        return axis_maps(by_raw_axis)


def _channel_files(folder: Path, case: str, num_channels: int, file_ending: str) -> list[Path]:
    files = [folder / f"{case}_{c:04d}{file_ending}" for c in range(num_channels)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} of case {case}")
    return files


def _cases(folder: Path, file_ending: str) -> list[str]:
    return sorted({p.name[:-len(file_ending) - 5] for p in folder.glob(f"*_0000{file_ending}")})


def write_coordinate_channels(source, image_folder: Path, output_folder: Path, num_channels: int,
                              file_ending: str) -> list[str]:
    """Copy every case's channels from image_folder to output_folder and add the 3 coordinate channels
    (`<case>_<num_channels + k>`), in the first channel's geometry; returns the cases."""
    cases = _cases(image_folder, file_ending)
    if not cases:
        raise ValueError(f"{image_folder} holds no '*_0000{file_ending}' image")
    output_folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        files = _channel_files(image_folder, case, num_channels, file_ending)
        maps = source(files)
        reference = sitk.ReadImage(str(files[0]))
        if maps.shape[1:] != reference.GetSize()[::-1]:
            raise ValueError(f"coordinates of shape {maps.shape[1:]} for {files[0]} of size "
                             f"{reference.GetSize()[::-1]}")
        for file in files:
            shutil.copyfile(file, output_folder / file.name)
        for k in range(COORDINATE_CHANNELS):
            channel = sitk.GetImageFromArray(maps[k])
            channel.CopyInformation(reference)
            sitk.WriteImage(channel, str(output_folder / f"{case}_{num_channels + k:04d}{file_ending}"),
                            useCompression=True)
    return cases


def image_channel_count(dataset_json: dict) -> int:
    """The dataset's channels before coordinates; a dataset that already has them is refused."""
    if COORDINATES_KEY in dataset_json:
        raise ValueError(f"the dataset already holds coordinate channels ({dataset_json[COORDINATES_KEY]}); start "
                         f"from the dataset without them")
    return len(dataset_json["channel_names"])


def add_coordinates_to_dataset(source_raw: Path, raw_root: Path, dataset_id: int, name: str, source,
                               overwrite: bool = False) -> Path:
    """A new raw dataset Dataset<id>_<name>: the source dataset's images with coordinate channels, its labels, and
    a dataset.json naming the coordinate channels `noNorm` (nnU-Net leaves them unnormalised)."""
    check_dataset_name(name)
    dataset_json = json.loads((source_raw / "dataset.json").read_text())
    num_channels, file_ending = image_channel_count(dataset_json), dataset_json["file_ending"]
    target = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    with staged_dataset(target, dataset_id, overwrite) as staging:
        for split in ("Tr", "Ts"):
            if (source_raw / f"images{split}").is_dir():
                write_coordinate_channels(source, source_raw / f"images{split}", staging / f"images{split}",
                                          num_channels, file_ending)
            if (source_raw / f"labels{split}").is_dir():
                shutil.copytree(source_raw / f"labels{split}", staging / f"labels{split}")
        channels = list(range(num_channels, num_channels + COORDINATE_CHANNELS))
        dataset_json = {**dataset_json, "name": name,
                        "channel_names": {**dataset_json["channel_names"],
                                          **{str(c): COORDINATE_CHANNEL_NAME for c in channels}},
                        COORDINATES_KEY: {"channels": channels, "axes": "raw array axes (z, y, x)",
                                          "units_mm": MM_PER_UNIT, **source.record()}}
        (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion add-coordinates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a raw dataset folder (Dataset<id>_<name>), or with -o a folder of "
                        "images in nnU-Net's naming (<case>_<channel>.nii.gz) to prepare for nnUNetv2_predict")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bpr", type=Path, help="checkpoint_final.pth of an nnUNetTrainerBPR training")
    where.add_argument("--geometry", action="store_true", help="the images' own geometry (origin, spacing)")
    parser.add_argument("--dataset-id", type=int, help="id of the new dataset")
    parser.add_argument("--name", help="name of the new dataset")
    add_raw_root_argument(parser)
    parser.add_argument("-o", "--output", type=Path, help="images mode: the folder for the images with coordinates")
    parser.add_argument("--channels", type=int, default=1, help="images mode: image channels per case (default 1)")
    parser.add_argument("--file-ending", default=".nii.gz", help="images mode (default .nii.gz)")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset folder of the same name")
    args = parser.parse_args(argv)
    try:
        source = GeometryCoordinates() if args.geometry else BPRCoordinates(args.bpr)
        if args.output is not None:
            cases = write_coordinate_channels(source, args.source, args.output, args.channels, args.file_ending)
            print(f"{len(cases)} case(s) with coordinates in {args.output}")
            return 0
        if args.dataset_id is None or args.name is None:
            parser.error("a new dataset needs --dataset-id and --name (or give -o for a folder of images)")
        folder = add_coordinates_to_dataset(args.source, Path(raw_root_argument(parser, args)), args.dataset_id,
                                            args.name, source, overwrite=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(folder)
    return 0
