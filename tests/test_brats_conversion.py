"""BraTS 2013 → nnU-Net raw conversion on a tiny generated look-alike, and (slow) on the real DeepMedic copy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_diffusion.datasets import brats
from nnunet_diffusion.datasets.brats import convert_brats, main

# ../shared/data next to the repository, else the workspace's absolute location
REAL_DATA = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2013_deepmedic",
                              Path("/work/shared/data/brats2013_deepmedic")) if p.is_dir()),
                 Path("/work/shared/data/brats2013_deepmedic"))
# The spec's mapping, written out independently of the module: necrosis 1 and non-enhancing 3 → core 2,
# oedema 2 → 1, enhancing 4 → 3.
SPEC_MAP = {0: 0, 1: 2, 2: 1, 3: 2, 4: 3}

SHAPE = (10, 12, 14)  # array order (z, y, x)
BOX = (slice(1, 9), slice(2, 10), slice(3, 13))  # brain bounding box: 8 × 8 × 10 voxels, even on every axis
ORIGIN = (0.0, -239.0, 0.0)  # (x, y, z), as in the real data


def make_case(folder: Path, seed: int) -> dict[str, np.ndarray]:
    """A 1 mm case whose labels come in 2³ blocks aligned to the brain box, so 2 mm nearest-neighbour sampling
    must return exactly one label per block and linear sampling exactly the 2³ block mean."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    blocks = rng.integers(0, 5, size=(4, 4, 5))
    labels = np.zeros(SHAPE, dtype=np.float32)
    labels[BOX] = blocks.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    brain = np.zeros(SHAPE, dtype=np.float32)
    brain[BOX] = 1
    brain[BOX[0].start + 3, BOX[1].start + 3, BOX[2].start + 3] = 0  # a hole inside does not change the box
    arrays = {"Flair_subtrMeanDivStd.nii.gz": rng.normal(size=SHAPE).astype(np.float32),
              "T1c_subtrMeanDivStd.nii.gz": rng.normal(size=SHAPE).astype(np.float32),
              "brainmask.nii.gz": brain, "OTMultiClass.nii.gz": labels}
    for name, array in arrays.items():
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(ORIGIN)
        sitk.WriteImage(image, str(folder / name))
    return {"blocks": blocks, **arrays}


def block_mean(array: np.ndarray) -> np.ndarray:
    z, y, x = (s // 2 for s in array.shape)
    return array.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    root = tmp_path / "brats2013_deepmedic"
    cases = {name: make_case(root / name, seed) for seed, name in enumerate(["brats_2013_pat0003_1",
                                                                              "brats_2013_pat0004_1"])}
    return root, cases


def test_convert_crops_resamples_and_maps_labels(source, tmp_path: Path):
    root, cases = source
    target = convert_brats(root, tmp_path / "raw", dataset_id=7)
    assert target == tmp_path / "raw" / "Dataset007_BraTS2013"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset007_BraTS2013"]  # no temp folder left
    (tmp_path / "probe").mkdir()
    assert target.stat().st_mode == (tmp_path / "probe").stat().st_mode  # umask honoured, not a private 0700

    meta = json.loads((target / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "oedema": 1, "core": 2, "enhancing": 3}
    assert meta["channel_names"] == {"0": "noNorm", "1": "noNorm"}
    found = get_filenames_of_train_images_and_targets(str(target), meta)  # nnU-Net's own case discovery
    assert sorted(found) == sorted(cases) and all(len(v["images"]) == 2 for v in found.values())

    box_start_xyz = np.array([BOX[2].start, BOX[1].start, BOX[0].start], dtype=float)
    for name, arrays in cases.items():
        label = sitk.ReadImage(str(target / "labelsTr" / f"{name}.nii.gz"))
        assert label.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
        assert label.GetSize() == (5, 4, 4)  # box (x, y, z) = (10, 8, 8) voxels of 1 mm → 2 mm
        # the 2 mm voxels' outer edges coincide with the box's: first centre at box start + 0.5 mm
        assert label.GetOrigin() == pytest.approx(tuple(np.array(ORIGIN) + box_start_xyz + 0.5))
        expected = np.vectorize(SPEC_MAP.get)(arrays["blocks"])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)
        for channel, source_file in enumerate(["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]):
            image = sitk.ReadImage(str(target / "imagesTr" / f"{name}_{channel:04d}.nii.gz"))
            assert image.GetPixelID() == sitk.sitkFloat32
            assert (image.GetSize(), image.GetOrigin(), image.GetSpacing()) == \
                (label.GetSize(), label.GetOrigin(), label.GetSpacing())
            np.testing.assert_allclose(sitk.GetArrayFromImage(image), block_mean(arrays[source_file][BOX]),
                                       atol=1e-5)


def test_whole_tumour_and_main(source, tmp_path: Path, capsys: pytest.CaptureFixture):
    root, cases = source
    assert main([str(root), "--raw-root", str(tmp_path / "raw"), "--dataset-id", "502", "--whole-tumour"]) == 0
    target = tmp_path / "raw" / "Dataset502_BraTS2013WT"
    assert str(target) in capsys.readouterr().out
    assert json.loads((target / "dataset.json").read_text())["labels"] == {"background": 0, "tumour": 1}
    for name, arrays in cases.items():
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "labelsTr" / f"{name}.nii.gz")))
        np.testing.assert_array_equal(label, arrays["blocks"] > 0)


def test_missing_source_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_brats(tmp_path / "nowhere", tmp_path / "raw")


def test_case_missing_a_file_is_named(source, tmp_path: Path):
    root, _ = source
    (root / "brats_2013_pat0004_1" / "T1c_subtrMeanDivStd.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="brats_2013_pat0004_1/T1c_subtrMeanDivStd.nii.gz"):
        convert_brats(root, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # checked before anything is written


def test_raw_root_unset(source, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    root, _ = source
    with pytest.raises(ValueError, match="raw_root is not set"):
        convert_brats(root, None)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main([str(root)]) == 1
    assert "nnUNet_raw" in capsys.readouterr().err


def test_refuses_to_write_into_the_repository(source):
    root, _ = source
    repository = Path(__file__).resolve().parents[1]
    if not Path(brats.__file__).resolve().is_relative_to(repository):
        pytest.skip("the package is not installed from this checkout; the guard only protects its own repository")
    with pytest.raises(ValueError, match="inside the repository"):
        convert_brats(root, repository / "nnUNet_raw")
    assert not (repository / "nnUNet_raw").exists()


def test_existing_dataset_id_is_not_overwritten(source, tmp_path: Path):
    root, _ = source
    (tmp_path / "raw" / "Dataset501_Other").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="Dataset501_Other"):
        convert_brats(root, tmp_path / "raw")


def test_failure_midway_leaves_no_dataset(source, tmp_path: Path):
    root, _ = source
    bad = root / "brats_2013_pat0004_1" / "OTMultiClass.nii.gz"  # second case: converted after the first
    sitk.WriteImage(sitk.GetImageFromArray(np.full(SHAPE, 5, dtype=np.float32)), str(bad))
    with pytest.raises(ValueError) as error:
        convert_brats(root, tmp_path / "raw")
    assert str(bad) in str(error.value)
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real BraTS data not found at {REAL_DATA}")
def test_convert_real_data(tmp_path: Path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    target = convert_brats(REAL_DATA, tmp_path / "raw")
    cases = sorted(p.name for p in REAL_DATA.iterdir() if p.is_dir())
    meta = json.loads((target / "dataset.json").read_text())
    assert meta["numTraining"] == len(cases) > 0
    seen = set()
    for name in cases:
        source_label = sitk.ReadImage(str(REAL_DATA / name / "OTMultiClass.nii.gz"))
        brain = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_DATA / name / "brainmask.nii.gz"))) > 0
        coords = np.argwhere(brain)
        extent_mm = (coords.max(0) - coords.min(0) + 1)[::-1] * np.array(source_label.GetSpacing())
        label = sitk.ReadImage(str(target / "labelsTr" / f"{name}.nii.gz"))
        assert label.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
        assert np.abs(np.array(label.GetSize()) - extent_mm / 2).max() <= 0.5
        values = np.unique(sitk.GetArrayFromImage(label))
        assert set(values) <= {0, 1, 2, 3}
        seen |= set(values)
        source_tumour_mm3 = (sitk.GetArrayFromImage(source_label) > 0).sum() * np.prod(source_label.GetSpacing())
        converted_tumour_mm3 = (sitk.GetArrayFromImage(label) > 0).sum() * 8.0
        assert converted_tumour_mm3 == pytest.approx(source_tumour_mm3, rel=0.1)
        for channel in (0, 1):
            image = sitk.ReadImage(str(target / "imagesTr" / f"{name}_{channel:04d}.nii.gz"))
            assert image.GetSize() == label.GetSize()
            assert image.GetOrigin() == pytest.approx(label.GetOrigin())
    assert seen == {0, 1, 2, 3}
    verify_dataset_integrity(str(target), num_processes=1)
