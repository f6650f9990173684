"""Coordinate channels: per-case maps from the image geometry or a whole-slice BPR, written as `noNorm` channels
of a new raw dataset, and carried through nnU-Net's preprocessing with their values intact."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.bpr.body_coordinates import AxisLine, fit_axis_line, pooled_r2
from nnunet_diffusion.cli import main as cli_main
from nnunet_diffusion.datasets.coordinate_channels import (COORDINATES_KEY, BPRCoordinates, GeometryCoordinates,
                                                           add_coordinates_to_dataset)
from nnunet_diffusion.datasets.phantom import generate_phantom_dataset
from nnunet_runs import run


def test_a_line_through_slice_scores_ignores_outlying_slices_and_needs_three():
    positions = np.arange(20) * 5.0
    scores = 0.3 + positions / 100
    scores[[3, 11]] += [2.0, -1.5]  # two slices scored far off
    line = fit_axis_line(positions, scores)
    assert line.slope == pytest.approx(0.01) and line.intercept == pytest.approx(0.3)
    np.testing.assert_allclose(AxisLine(0.01, 0.3, 20).at(positions), 0.3 + positions / 100)
    with pytest.raises(ValueError, match="at least 3 informative slices"):
        fit_axis_line(positions[:2], scores[:2])


def test_pooled_r2_counts_offsets_between_cases_that_each_case_alone_hides():
    true = [np.linspace(0, 1, 10), np.linspace(0.5, 1.5, 10)]
    assert pooled_r2([t + 0.2 for t in true], true) == pytest.approx(1.0)  # one shared offset is free
    assert pooled_r2([true[0] + 0.8, true[1] - 0.8], true) < 0.3  # case offsets are errors


def test_geometry_coordinates_are_each_voxels_position_along_each_array_axis(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    image.SetSpacing((2.0, 3.0, 5.0))
    image.SetOrigin((10.0, -20.0, 300.0))
    sitk.WriteImage(image, str(tmp_path / "case_0000.nii.gz"))
    maps = GeometryCoordinates()([tmp_path / "case_0000.nii.gz"])
    assert maps.shape == (3, 4, 5, 6)
    np.testing.assert_allclose(maps[0, :, 0, 0], (300 + 5 * np.arange(4)) / 100, rtol=1e-6)
    np.testing.assert_allclose(maps[1, 0, :, 0], (-20 + 3 * np.arange(5)) / 100, rtol=1e-6)
    np.testing.assert_allclose(maps[2, 0, 0, :], (10 + 2 * np.arange(6)) / 100, rtol=1e-6)
    assert np.all(maps[0] == maps[0, :, :1, :1])
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # the z index runs towards -z
    sitk.WriteImage(image, str(tmp_path / "flipped_0000.nii.gz"))
    along = GeometryCoordinates()([tmp_path / "flipped_0000.nii.gz"])[0, :, 0, 0]
    np.testing.assert_allclose(along, (-300 + 5 * np.arange(4)) / 100, rtol=1e-6)  # along the axis's direction


def test_a_dataset_gets_three_nonorm_channels_and_keeps_its_labels(tmp_path):
    phantom = generate_phantom_dataset(tmp_path / "raw", 611, "CoordPhantom", num_train=2, num_test=1, seed=3)
    target = add_coordinates_to_dataset(phantom, tmp_path / "raw", 612, "CoordPhantomXYZ", GeometryCoordinates())
    dataset_json = json.loads((target / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT", "1": "noNorm", "2": "noNorm", "3": "noNorm"}
    assert dataset_json[COORDINATES_KEY]["channels"] == [1, 2, 3]
    assert dataset_json[COORDINATES_KEY]["source"] == "geometry"
    assert sorted(p.name for p in (target / "imagesTr").iterdir()) == sorted(
        f"coordphantom_{i:03d}_{c:04d}.nii.gz" for i in range(2) for c in range(4))
    assert sorted(p.name for p in (target / "labelsTr").iterdir()) == sorted(
        p.name for p in (phantom / "labelsTr").iterdir())
    assert len(list((target / "imagesTs").iterdir())) == 4
    image = sitk.ReadImage(str(target / "imagesTr" / "coordphantom_000_0000.nii.gz"))
    z = sitk.ReadImage(str(target / "imagesTr" / "coordphantom_000_0001.nii.gz"))
    assert z.GetOrigin() == image.GetOrigin() and z.GetSize() == image.GetSize()
    np.testing.assert_allclose(sitk.GetArrayFromImage(z)[:, 0, 0],
                               (image.GetOrigin()[2] + image.GetSpacing()[2] * np.arange(image.GetSize()[2])) / 100,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="already holds coordinate channels"):
        add_coordinates_to_dataset(target, tmp_path / "raw", 613, "Twice", GeometryCoordinates())
    assert not (tmp_path / "raw" / "Dataset613_Twice").exists()


def test_nnunets_preprocessing_keeps_the_coordinate_values_and_moves_them_with_the_image(nnunet_workspace):
    raw = Path(os.environ["nnUNet_raw"])
    phantom = generate_phantom_dataset(raw, 614, "CoordSource", num_train=3, num_test=0, seed=4)
    assert cli_main(["add-coordinates", str(phantom), "--geometry", "--dataset-id", "615", "--name",
                     "CoordPre"]) == 0
    run(["nnUNetv2_plan_and_preprocess", "-d", "615", "-c", "3d_fullres", "-np", "1"])
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / "Dataset615_CoordPre"
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == [
        "CTNormalization", "NoNormalization", "NoNormalization", "NoNormalization"]
    target_spacing = plans["configurations"]["3d_fullres"]["spacing"]
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = preprocessed / "nnUNetPlans_3d_fullres"
    dataset = infer_dataset_class(str(folder))(str(folder))
    for case in dataset.identifiers:
        data = np.asarray(dataset.load_case(case)[0])
        source = sitk.ReadImage(str(phantom / "imagesTr" / f"{case.replace('coordpre', 'coordsource')}_0000.nii.gz"))
        origin_z = source.GetOrigin()[2]
        z = data[1, :, data.shape[2] // 2, data.shape[3] // 2]
        # unnormalised, resampled to the target spacing: a line from the first voxel's true position (nnU-Net's
        # cubic resampling bends it at the first and last voxel, by under 0.5 mm)
        np.testing.assert_allclose(np.diff(z)[1:-1], target_spacing[0] / 100, atol=2e-3)
        np.testing.assert_allclose(np.diff(z), target_spacing[0] / 100, atol=5e-3)
        assert abs(z[0] - origin_z / 100) < target_spacing[0] / 100
        assert np.ptp(data[1, 3]) < 1e-4 and np.ptp(data[3][:, :, 5]) < 1e-4  # constant across the other axes


def test_bpr_coordinates_are_one_line_per_case_and_axis(demo_dataset, bpr_checkpoint, tmp_path):
    source = BPRCoordinates(bpr_checkpoint)
    image = sorted((demo_dataset.raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    maps = source([image])
    assert maps.shape == (3, *sitk.ReadImage(str(image)).GetSize()[::-1]) and np.isfinite(maps).all()
    for axis in range(3):
        along = np.moveaxis(maps[axis], axis, 0)
        assert np.ptp(along, axis=(1, 2)).max() < 1e-5, "constant across each slice"
        steps = np.diff(along[:, 0, 0])
        assert np.allclose(steps, steps[0], atol=1e-5), "a line along the axis"
    assert source.record()["bpr"] == str(bpr_checkpoint.resolve())
    with pytest.raises(FileNotFoundError, match="nnUNetTrainerBPR"):
        BPRCoordinates(tmp_path / "missing.pth")
