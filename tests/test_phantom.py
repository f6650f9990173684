"""The generated CT-like torso phantom: determinism, labels, geometry, anatomy and variation, safe writing, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.datasets.phantom import (ALWAYS_IN_VIEW_MM, IN_PLANE_SIZE, IN_PLANE_SPACING_MM, LABELS,
                                               ORGAN_SIZE_GROUPS, Z_SLICES_RANGE, Z_SPACINGS_MM,
                                               generate_phantom_dataset, main)

NUM_TRAIN, NUM_TEST = 5, 1


def read_case(folder, split, case):
    image = sitk.ReadImage(str(folder / f"images{split}" / f"{case}_0000.nii.gz"))
    labels = sitk.ReadImage(str(folder / f"labels{split}" / f"{case}.nii.gz"))
    return image, sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return generate_phantom_dataset(tmp_path_factory.mktemp("raw"), num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3)


@pytest.fixture(scope="module")
def training_cases(phantom):
    cases = sorted(p.name[:-len(".nii.gz")] for p in (phantom / "labelsTr").iterdir())
    return [read_case(phantom, "Tr", case) for case in cases]


def test_layout_and_dataset_json(phantom):
    assert phantom.name == "Dataset601_Phantom"
    dataset = json.loads((phantom / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == LABELS and dataset["labels"]["background"] == 0
    assert sorted(LABELS.values()) == list(range(len(LABELS)))
    assert dataset["numTraining"] == NUM_TRAIN and dataset["file_ending"] == ".nii.gz"
    assert len(list((phantom / "imagesTr").iterdir())) == len(list((phantom / "labelsTr").iterdir())) == NUM_TRAIN
    assert len(list((phantom / "imagesTs").iterdir())) == len(list((phantom / "labelsTs").iterdir())) == NUM_TEST
    assert not [p for p in phantom.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_size_groups_cover_every_organ_and_follow_organ_volumes(training_cases):
    organs = [name for name in LABELS if name != "background"]
    assert sorted(ORGAN_SIZE_GROUPS) == sorted(organs)
    volumes = {name: np.mean([np.sum(labels == LABELS[name]) for _, _, labels in training_cases]) for name in organs}
    group_means = {group: np.mean([volumes[n] for n in organs if ORGAN_SIZE_GROUPS[n] == group])
                   for group in ("big", "medium", "small")}
    assert group_means["big"] > group_means["medium"] > group_means["small"] > 0


def test_geometry_intensities_and_anatomy(training_cases):
    for image, array, labels in training_cases:
        assert array.dtype == np.int16 and labels.shape == array.shape
        assert array.shape[1:] == (IN_PLANE_SIZE, IN_PLANE_SIZE)
        assert Z_SLICES_RANGE[0] <= array.shape[0] <= Z_SLICES_RANGE[1]
        spacing = image.GetSpacing()
        assert spacing[:2] == (IN_PLANE_SPACING_MM, IN_PLANE_SPACING_MM) and spacing[2] in Z_SPACINGS_MM
        assert set(np.unique(labels)) <= set(LABELS.values())
        assert abs(np.mean(array[:, :3, :3]) + 1000) < 30, "air around the body"
        # The abdomen is always in view, so every case shows the big organs.
        for name in ("liver", "spleen", "kidney_left", "kidney_right", "stomach"):
            assert np.any(labels == LABELS[name]), name
        # The liver lies on the patient's right (low x index), the spleen on the left.
        liver_x = np.argwhere(labels == LABELS["liver"])[:, 2].mean()
        spleen_x = np.argwhere(labels == LABELS["spleen"])[:, 2].mean()
        assert liver_x < IN_PLANE_SIZE / 2 < spleen_x
    assert ALWAYS_IN_VIEW_MM[0] < ALWAYS_IN_VIEW_MM[1]


def test_organs_are_not_separable_by_intensity_alone(training_cases):
    """A probe has to use context: soft organs overlap in HU with each other and with their surroundings."""
    image_values = np.concatenate([a.ravel() for _, a, _ in training_cases])
    label_values = np.concatenate([lab.ravel() for _, _, lab in training_cases])
    liver = image_values[label_values == LABELS["liver"]]
    spleen = image_values[label_values == LABELS["spleen"]]
    pancreas = image_values[label_values == LABELS["pancreas"]]
    assert abs(np.median(liver) - np.median(spleen)) < 40
    assert np.percentile(spleen, 90) > np.percentile(liver, 10)
    assert np.percentile(pancreas, 90) > np.percentile(spleen, 10)
    soft_background = image_values[(label_values == 0) & (image_values > -50) & (image_values < 150)]
    assert soft_background.size > liver.size, "plenty of unlabelled soft tissue at organ-like HU"


def test_cases_vary_in_field_of_view_position_and_organ_size(training_cases):
    shapes = {a.shape for _, a, _ in training_cases}
    liver_volumes = [np.sum(lab == LABELS["liver"]) for _, _, lab in training_cases]
    kidney_rows = [np.argwhere(lab == LABELS["kidney_left"])[:, 1].mean() for _, _, lab in training_cases]
    assert len(shapes) > 1
    assert np.std(liver_volumes) > 0.05 * np.mean(liver_volumes)
    assert np.ptp(kidney_rows) > 1.0


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    first = generate_phantom_dataset(tmp_path / "a", num_train=2, num_test=0, seed=7)
    second = generate_phantom_dataset(tmp_path / "b", num_train=2, num_test=0, seed=7)
    third = generate_phantom_dataset(tmp_path / "c", num_train=2, num_test=0, seed=8)
    for case in ("phantom_000", "phantom_001"):
        _, image_a, labels_a = read_case(first, "Tr", case)
        _, image_b, labels_b = read_case(second, "Tr", case)
        _, image_c, _ = read_case(third, "Tr", case)
        assert np.array_equal(image_a, image_b) and np.array_equal(labels_a, labels_b)
        assert image_a.shape != image_c.shape or not np.array_equal(image_a, image_c)


def test_existing_datasets_are_protected(tmp_path):
    folder = generate_phantom_dataset(tmp_path, num_train=1, num_test=0, seed=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_phantom_dataset(tmp_path, num_train=1, num_test=0, seed=0)
    generate_phantom_dataset(tmp_path, num_train=2, num_test=0, seed=0, overwrite=True)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
    (tmp_path / "probe").mkdir()
    assert folder.stat().st_mode == (tmp_path / "probe").stat().st_mode  # umask honoured, not a private 0700
    (tmp_path / "probe").rmdir()
    with pytest.raises(FileExistsError, match="dataset id 601 is already used by Dataset601_Phantom"):
        generate_phantom_dataset(tmp_path, name="Other", num_train=1, num_test=0, overwrite=True)
    with pytest.raises(ValueError, match="letters, digits"):
        generate_phantom_dataset(tmp_path, dataset_id=602, name="bad name", num_train=1, num_test=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset601_Phantom"]


def test_cli_needs_an_output_folder_and_honours_nnUNet_raw_and_force(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--num-train", "1", "--num-test", "0"])
    assert exit_info.value.code == 2 and "nnUNet_raw" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main(["--num-train", "1", "--num-test", "0", "--dataset-id", "605"]) == 0
    assert (tmp_path / "Dataset605_Phantom" / "dataset.json").is_file()
    with pytest.raises(SystemExit):
        main(["--num-train", "1", "--num-test", "0", "--dataset-id", "605"])
    assert "--force" in capsys.readouterr().err
    assert main(["--num-train", "1", "--num-test", "0", "--dataset-id", "605", "--force"]) == 0
