"""The shared helpers: NaN-aware mean, temporary environment variables, nnU-Net's model folder names."""
import math
import os
from pathlib import Path

import pytest

from nnunet_diffusion.utils import environment, model_folder, nanmean


def test_nanmean_skips_nan_and_is_nan_without_values():
    assert nanmean([1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(nanmean([float("nan")])) and math.isnan(nanmean([]))


def test_environment_sets_unsets_and_restores_even_on_error(monkeypatch):
    monkeypatch.setenv("NNUNET_DIFFUSION_TEST_A", "1")
    monkeypatch.delenv("NNUNET_DIFFUSION_TEST_B", raising=False)
    with pytest.raises(RuntimeError):
        with environment(NNUNET_DIFFUSION_TEST_A=None, NNUNET_DIFFUSION_TEST_B="2"):
            assert "NNUNET_DIFFUSION_TEST_A" not in os.environ
            assert os.environ["NNUNET_DIFFUSION_TEST_B"] == "2"
            raise RuntimeError
    assert os.environ["NNUNET_DIFFUSION_TEST_A"] == "1" and "NNUNET_DIFFUSION_TEST_B" not in os.environ


def test_model_folder_is_named_as_nnunets_get_output_folder(tmp_path, monkeypatch):
    import nnunetv2.utilities.file_path_utilities as file_paths
    monkeypatch.setattr(file_paths, "nnUNet_results", str(tmp_path))
    expected = file_paths.get_output_folder("Dataset990_DiffusionDemo", "nnUNetTrainerDiff", "nnUNetPlansCPU", "3d_cpu")
    assert model_folder(tmp_path, "Dataset990_DiffusionDemo", "nnUNetTrainerDiff", "nnUNetPlansCPU",
                        "3d_cpu") == Path(expected)
