"""`nnunet-diffusion uncertainty`: maps in the input's geometry, ≥ 0, and the segmentation of the mean."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.datasets.synthetic import LABELS
from nnunet_diffusion.evaluation.commands.uncertainty import main
from nnunet_runs import train_if_missing

DIFFUSION = "nnUNetTrainerDiff"



@pytest.fixture(scope="module")
def moved_images(demo_dataset, tmp_path_factory) -> Path:
    """The test images with another origin and direction, so that copying the geometry is not a no-op."""
    folder = tmp_path_factory.mktemp("images")
    for file in sorted(demo_dataset.test_images.glob("*_0000.nii.gz")):
        image = sitk.ReadImage(str(file))
        image.SetOrigin((12.5, -4.0, 30.0))
        image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
        sitk.WriteImage(image, str(folder / file.name))
    return folder


def run(dataset, images: Path, output: Path, measure: str, *extra: str) -> list[Path]:
    assert main(["-m", str(train_if_missing(dataset, DIFFUSION)), "-i", str(images), "-o", str(output), "--seeds", "0", "1",
                 "--measure", measure, "-device", "cpu", "--disable-tta", *extra]) == 0
    return sorted(images.glob("*_0000.nii.gz"))


def assert_same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing())
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin())
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection())


def test_variance_map_overlays_the_input_and_segmentation_is_of_the_mean(demo_dataset, moved_images, tmp_path):
    images = run(demo_dataset, moved_images, tmp_path, "variance", "--keep-samples")
    largest = []
    for image_file in images:
        case = image_file.name[:-len("_0000.nii.gz")]
        image = sitk.ReadImage(str(image_file))
        variance = sitk.ReadImage(str(tmp_path / f"{case}_variance.nii.gz"))
        segmentation = sitk.ReadImage(str(tmp_path / f"{case}.nii.gz"))
        assert_same_geometry(variance, image)
        assert_same_geometry(segmentation, image)
        values = sitk.GetArrayFromImage(variance)
        assert values.min() >= 0
        largest.append(values.max())
        samples = [np.load(tmp_path / "samples" / f"seed_{s}" / f"{case}.npz")["probabilities"] for s in (0, 1)]
        np.testing.assert_array_equal(sitk.GetArrayFromImage(segmentation), np.mean(samples, axis=0).argmax(0))
    assert max(largest) > 0  # the two seeds gave different samples


def test_entropy_map_lies_between_zero_and_log_of_the_class_count(demo_dataset, moved_images, tmp_path):
    for image_file in run(demo_dataset, moved_images, tmp_path, "entropy"):
        entropy = sitk.ReadImage(str(tmp_path / image_file.name.replace("_0000.nii.gz", "_entropy.nii.gz")))
        assert_same_geometry(entropy, sitk.ReadImage(str(image_file)))
        values = sitk.GetArrayFromImage(entropy)
        assert values.min() >= 0 and values.max() <= math.log(len(LABELS)) + 1e-5
    assert not (tmp_path / "samples").exists()


def test_a_stock_model_is_refused(demo_dataset, tmp_path):
    with pytest.raises(SystemExit, match="not a diffusion trainer"):
        main(["-m", str(train_if_missing(demo_dataset, "nnUNetTrainer")), "-i", str(demo_dataset.test_images),
              "-o", str(tmp_path), "--seeds", "0", "1", "-device", "cpu"])
