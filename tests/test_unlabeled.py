"""Unlabeled image folder → nnU-Net raw dataset: layout, body-mask labels nnU-Net accepts, clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.datasets.phantom import generate_phantom_dataset
from nnunet_diffusion.datasets.unlabeled import UNLABELED_LABELS, images_to_dataset, main


@pytest.fixture(scope="module")
def phantom_images(tmp_path_factory):
    """Three phantom CTs in a plain folder (named as a user's files might be)."""
    phantom = generate_phantom_dataset(tmp_path_factory.mktemp("phantom"), num_train=3, num_test=0, seed=1)
    folder = tmp_path_factory.mktemp("images")
    for index, path in enumerate(sorted((phantom / "imagesTr").iterdir())):
        shutil.copy(path, folder / f"patient{index}.nii.gz")
    (folder / "notes.txt").write_text("not an image; ignored")
    return folder


def test_layout_dataset_json_and_unchanged_images(phantom_images, tmp_path):
    folder = images_to_dataset(phantom_images, tmp_path, 700, "Unlabeled")
    assert folder == tmp_path / "Dataset700_Unlabeled"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == UNLABELED_LABELS == {"background": 0, "foreground": 1}
    assert dataset["channel_names"] == {"0": "CT"} and dataset["numTraining"] == 3
    assert dataset["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"patient{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"patient{i}.nii.gz" for i in range(3)]
    source = sitk.ReadImage(str(phantom_images / "patient0.nii.gz"))
    written = sitk.ReadImage(str(folder / "imagesTr" / "patient0_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(written))
    assert written.GetSpacing() == source.GetSpacing() and written.GetOrigin() == source.GetOrigin()


def test_labels_are_a_filled_body_mask_on_the_image_grid(phantom_images, tmp_path):
    folder = images_to_dataset(phantom_images, tmp_path, 700, "Unlabeled")
    image = sitk.ReadImage(str(folder / "imagesTr" / "patient0_0000.nii.gz"))
    labels = sitk.ReadImage(str(folder / "labelsTr" / "patient0.nii.gz"))
    assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
    hu, mask = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    assert set(np.unique(mask)) == {0, 1}
    assert np.all(mask[hu > -200] == 1), "all tissue is body"
    assert np.all(mask[:, :3, :3] == 0), "air in the corners is not"
    enclosed_gas = (hu < -500) & (mask == 1)
    assert enclosed_gas.any(), "gas and lung inside the body are filled in"


def test_nnunet_accepts_the_dataset_and_finds_foreground_for_its_ct_statistics(phantom_images, tmp_path):
    """All-zero labels pass the integrity check but leave nnU-Net's fingerprint without foreground intensities
    (its CT normalisation statistics then crash); the body mask gives it foreground."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder = images_to_dataset(phantom_images, tmp_path, 700, "Unlabeled")
    verify_dataset_integrity(str(folder), num_processes=1)
    image_file = str(folder / "imagesTr" / "patient0_0000.nii.gz")
    body = DatasetFingerprintExtractor.analyze_case([image_file], str(folder / "labelsTr" / "patient0.nii.gz"),
                                                    SimpleITKIO, num_samples=100)
    assert len(body[2][0]) == 100
    empty_label = tmp_path / "empty.nii.gz"
    empty = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(sitk.ReadImage(image_file)).shape, np.uint8))
    empty.CopyInformation(sitk.ReadImage(image_file))
    sitk.WriteImage(empty, str(empty_label))
    nothing = DatasetFingerprintExtractor.analyze_case([image_file], str(empty_label), SimpleITKIO, num_samples=100)
    assert len(nothing[2][0]) == 0


def test_nii_input_is_written_as_nii_gz_and_channel_suffixes_are_dropped(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    image = sitk.GetImageFromArray(np.full((8, 9, 10), -1000, np.int16))
    image.SetSpacing((1.0, 2.0, 3.0))
    array = sitk.GetArrayFromImage(image)
    array[2:6, 2:7, 2:8] = 40
    body = sitk.GetImageFromArray(array)
    body.CopyInformation(image)
    sitk.WriteImage(body, str(source / "case_a_0000.nii"))
    folder = images_to_dataset(source, tmp_path / "raw", 701, "Nii")
    assert json.loads((folder / "dataset.json").read_text())["file_ending"] == ".nii.gz"
    assert [p.name for p in (folder / "imagesTr").iterdir()] == ["case_a_0000.nii.gz"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "case_a.nii.gz")))
    assert mask.sum() == 4 * 5 * 6


def test_non_ct_channels_use_an_otsu_threshold(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    array = np.zeros((6, 12, 12), np.float32)
    array[1:5, 3:9, 3:9] = 500.0
    sitk.WriteImage(sitk.GetImageFromArray(array), str(source / "mr.mha"))
    folder = images_to_dataset(source, tmp_path / "raw", 702, "Mr", channel_name="T1")
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "T1"}
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "mr.mha")))
    assert np.array_equal(mask.astype(bool), array > 0)


def write_image(path, shape=(6, 8, 8), value=0):
    sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, value, np.int16)), str(path))


@pytest.mark.parametrize("make_problem, error, message", [
    (lambda folder: None, ValueError, "no images in"),
    (lambda folder: (write_image(folder / "a.nii.gz", value=40), write_image(folder / "b.mha", value=40)),
     ValueError, "mixes file endings"),
    (lambda folder: (folder / "broken.nii.gz").write_bytes(b"not an image"), ValueError, "cannot read image"),
    (lambda folder: sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(folder / "flat.mha")),
     ValueError, "2D image"),
    (lambda folder: (write_image(folder / "a.nii.gz", value=40), write_image(folder / "a_0000.nii.gz", value=40)),
     ValueError, "same case name"),
    (lambda folder: write_image(folder / "air.nii.gz", value=-1000), ValueError, "body mask is empty"),
])
def test_clear_errors(tmp_path, make_problem, error, message):
    folder = tmp_path / "in"
    folder.mkdir()
    make_problem(folder)
    with pytest.raises(error, match=message):
        images_to_dataset(folder, tmp_path / "raw", 703, "Broken")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir()), "nothing half-written"


def test_missing_folder_existing_dataset_and_cli(phantom_images, tmp_path, monkeypatch, capsys):
    with pytest.raises(NotADirectoryError, match="does not exist"):
        images_to_dataset(tmp_path / "nowhere", tmp_path, 704, "Missing")
    images_to_dataset(phantom_images, tmp_path, 704, "Twice")
    with pytest.raises(FileExistsError, match="--force"):
        images_to_dataset(phantom_images, tmp_path, 704, "Twice")
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit):
        main([str(phantom_images), "--dataset-id", "705", "--name", "Cli"])
    assert "nnUNet_raw" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main([str(phantom_images), "--dataset-id", "705", "--name", "Cli"]) == 0
    assert (tmp_path / "Dataset705_Cli" / "dataset.json").is_file()
    assert main([str(phantom_images), "--dataset-id", "705", "--name", "Cli", "--force"]) == 0
