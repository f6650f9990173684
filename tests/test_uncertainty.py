"""Uncertainty maps on hand-made samples, and write_map_like's geometry copy, shape check and atomic write."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.evaluation import uncertainty
from nnunet_diffusion.evaluation.uncertainty import entropy_of_mean, variance_across_samples, write_map_like

# [sample=2, C=2, voxel=3]: voxel 0 both samples certain of class 0; voxel 1 each sample certain of another
# class; voxel 2 both samples undecided (0.5 / 0.5).
PROBS = np.array([
    [[1.0, 1.0, 0.5], [0.0, 0.0, 0.5]],
    [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]],
])


def test_entropy_of_mean_on_hand_made_samples():
    np.testing.assert_allclose(entropy_of_mean(PROBS), [0.0, math.log(2), math.log(2)])


def test_entropy_of_mean_three_classes():
    probs = np.array([[[0.1], [0.3], [0.6]], [[0.3], [0.3], [0.4]]])  # mean (0.2, 0.3, 0.5)
    expected = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert entropy_of_mean(probs) == pytest.approx([expected])


def test_variance_separates_disagreement_from_shared_doubt():
    # voxel 1: per class {1, 0} → variance 0.25 for both classes; voxel 2: samples agree → 0
    np.testing.assert_allclose(variance_across_samples(PROBS), [0.0, 0.25, 0.0])


def test_maps_keep_spatial_shape():
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(4, 5, 6, 7)).transpose(0, 4, 1, 2, 3)
    assert entropy_of_mean(probs).shape == (5, 6, 7)
    assert variance_across_samples(probs).shape == (5, 6, 7)


@pytest.mark.parametrize("probs, match", [
    (np.zeros((2, 3)), r"\[sample, C, \*spatial\]"),
    (PROBS * 3 - 1, "logits"),
    (PROBS[:1], "at least 2 sample"),
])
def test_variance_rejects_bad_input(probs: np.ndarray, match: str):
    with pytest.raises(ValueError, match=match):
        variance_across_samples(probs)


def reference_image(path: Path) -> Path:
    image = sitk.Image(5, 4, 3, sitk.sitkInt16)  # size (x, y, z) → array (z, y, x) = (3, 4, 5)
    image.SetSpacing((0.8, 1.2, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    c, s = math.cos(0.3), math.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def test_write_map_like_copies_reference_geometry(tmp_path: Path):
    ref = reference_image(tmp_path / "ref.nii.gz")
    values = np.arange(60, dtype=np.float64).reshape(3, 4, 5) / 7
    out = write_map_like(values, ref, tmp_path / "maps" / "entropy.nii.gz")
    written, reference = sitk.ReadImage(str(out)), sitk.ReadImage(str(ref))
    assert written.GetPixelID() == sitk.sitkFloat32
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(written), values.astype(np.float32))
    assert sorted(p.name for p in out.parent.iterdir()) == ["entropy.nii.gz"]  # no temporary file left
    (tmp_path / "probe").touch()
    assert out.stat().st_mode == (tmp_path / "probe").stat().st_mode  # umask honoured, not a private 0600


def test_write_map_like_rejects_wrong_shape(tmp_path: Path):
    ref = reference_image(tmp_path / "ref.nii.gz")
    with pytest.raises(ValueError, match=r"\(5, 4, 3\).*\(3, 4, 5\)"):  # (x, y, z) order instead of (z, y, x)
        write_map_like(np.zeros((5, 4, 3)), ref, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


def test_write_map_like_leaves_nothing_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ref = reference_image(tmp_path / "ref.nii.gz")

    def write_half_then_die(image, name):
        Path(name).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(uncertainty.sitk, "WriteImage", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_map_like(np.zeros((3, 4, 5)), ref, tmp_path / "out" / "map.nii.gz")
    assert list((tmp_path / "out").iterdir()) == []
