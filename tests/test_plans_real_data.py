"""Presets on the shared real datasets' nnU-Net plans (MSD Hippocampus 3d_fullres, ACDC 2d and 3d_fullres, BraTS
2013 2d): with nnU-Net's own patch the derivation reproduces nnU-Net's plan, and every preset's configuration
builds, trains one iteration in nnU-Net's loop and predicts a case with the stock nnUNetv2_predict.

Hippocampus and ACDC are planned on their first 20 cases (linked, not copied), which keeps planning short: the
topology depends only on the spacing and the median image size, and 20 cases of these homogeneous datasets give
the same spacing and a median close to the full dataset's."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.plans import (FEATURE_MAP_MIN_EDGE_LENGTH, MAX_POOLINGS_PER_AXIS, PresetOverrides,
                                    derive_plans, derived_plans_name, load_preset, plan_and_preprocess_with_preset,
                                    write_preset_plans)
from nnunet_diffusion.training import TrainingRun, train
from nnunet_diffusion.utils import TrainingBudget
from nnunet_diffusion.utils import environment
from nnunet_runs import Dataset, run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SUBSET_CASES = 20
PRESETS = {"hippocampus": ("cpu_tiny", "cpu_small"), "acdc": ("cpu_tiny", "cpu_small", "cpu_2d"),
           "brats": ("cpu_2d",)}


def _shared(folder: str) -> Path:
    path = SHARED_DATA / folder
    if not path.is_dir():
        pytest.skip(f"the shared dataset {path} is missing (see shared/README.md)")
    return path


def _linked_subset(source: Path, dataset_id: int, name: str, cases: int) -> Path:
    """The first `cases` cases of a raw dataset as a new raw dataset of symbolic links."""
    dataset_json = json.loads((source / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    target = Path(os.environ["nnUNet_raw"]) / f"Dataset{dataset_id:03d}_{name}"
    for folder in ("imagesTr", "labelsTr"):
        (target / folder).mkdir(parents=True)
    labels = sorted((source / "labelsTr").glob(f"*{ending}"))[:cases]
    for label in labels:
        (target / "labelsTr" / label.name).symlink_to(label)
        for image in (source / "imagesTr").glob(f"{label.name[:-len(ending)]}_[0-9][0-9][0-9][0-9]{ending}"):
            (target / "imagesTr" / image.name).symlink_to(image)
    (target / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": len(labels)}, indent=1))
    return target


def _plan_with_presets(raw: Path, dataset_id: int, presets: tuple[str, ...]) -> Dataset:
    """nnU-Net plans and preprocesses the first preset's parent, preprocesses the other parents with the same plans,
    and every preset's plans are written. nnUNet_n_proc_DA=0 would break nnUNetv2_plan_and_preprocess: unset."""
    with environment(nnUNet_n_proc_DA=None):
        plan_and_preprocess_with_preset(dataset_id, presets[0], os.environ["nnUNet_preprocessed"], run)
        preprocessed = {load_preset(presets[0])["inherits_from"]}
        folder = Path(os.environ["nnUNet_preprocessed"]) / raw.name
        for preset in presets[1:]:
            parent = load_preset(preset)["inherits_from"]
            if parent not in preprocessed:
                run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-c", parent, "-np", "2"])
                preprocessed.add(parent)
            write_preset_plans(folder, preset)
    return Dataset(dataset_id, raw)


@pytest.fixture(scope="module")
def hippocampus(nnunet_workspace) -> Dataset:
    raw = _linked_subset(_shared("msd_hippocampus"), 971, "Hippocampus", SUBSET_CASES)
    return _plan_with_presets(raw, 971, PRESETS["hippocampus"])


@pytest.fixture(scope="module")
def acdc(nnunet_workspace) -> Dataset:
    raw = _linked_subset(_shared("acdc"), 972, "ACDC", SUBSET_CASES)
    return _plan_with_presets(raw, 972, PRESETS["acdc"])


@pytest.fixture(scope="module")
def brats(nnunet_workspace) -> Dataset:
    source = _shared("brats2013_deepmedic")
    run(["nnunet-diffusion", "convert-brats", str(source), "--raw-root", os.environ["nnUNet_raw"], "--dataset-id",
         "973", "--spacing", "2", "--whole-tumour"])
    return _plan_with_presets(Path(os.environ["nnUNet_raw"]) / "Dataset973_BraTS2013WT", 973, PRESETS["brats"])


def _plans(dataset: Dataset, name: str = "nnUNetPlans") -> dict:
    return json.loads((Path(os.environ["nnUNet_preprocessed"]) / dataset.name / f"{name}.json").read_text())


@pytest.mark.parametrize("dataset_fixture, preset_name", [
    ("hippocampus", "cpu_tiny"), ("acdc", "cpu_tiny"), ("acdc", "cpu_2d"), ("brats", "cpu_2d")])
def test_with_nnunets_own_patch_the_derivation_is_nnunets_plan(dataset_fixture, preset_name, request):
    """The derivation is nnU-Net's planner, not an imitation: given the patch and widths nnU-Net planned, it
    gives back nnU-Net's network for that configuration."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    dataset = request.getfixturevalue(dataset_fixture)
    assert ExperimentPlanner(dataset.dataset_id).UNet_featuremap_min_edge_length == FEATURE_MAP_MIN_EDGE_LENGTH
    plans = _plans(dataset)
    preset = load_preset(preset_name)
    parent = plans["configurations"][preset["inherits_from"]]
    planned = parent["architecture"]["arch_kwargs"]
    overrides = PresetOverrides(tuple(parent["patch_size"]), base_features=planned["features_per_stage"][0],
                                max_features=planned["features_per_stage"][-1])
    derived = derive_plans(plans, overrides.apply(preset))["configurations"][preset["configuration"]]
    assert derived["patch_size"] == parent["patch_size"]
    kwargs = derived["architecture"]["arch_kwargs"]
    for key in ("n_stages", "strides", "kernel_sizes", "features_per_stage", "n_conv_per_stage",
                "n_conv_per_stage_decoder"):
        assert kwargs[key] == planned[key], key


def _one_case_input(dataset: Dataset, folder: Path) -> Path:
    """The images of the dataset's first case, linked into a folder of their own for nnUNetv2_predict."""
    first = sorted(dataset.raw.glob("imagesTr/*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    folder.mkdir()
    for image in dataset.raw.glob(f"imagesTr/{first}_[0-9][0-9][0-9][0-9].nii.gz"):
        (folder / image.name).symlink_to(image.resolve())
    return folder / f"{first}_0000.nii.gz"


@pytest.mark.parametrize("dataset_fixture, preset_name, trainer", [
    ("hippocampus", "cpu_tiny", "nnUNetTrainer"),
    ("hippocampus", "cpu_small", "nnUNetTrainerDiffRecycle"),
    ("acdc", "cpu_tiny", "nnUNetTrainerDiffRecycle"),
    ("acdc", "cpu_small", "nnUNetTrainer"),
    ("acdc", "cpu_2d", "nnUNetTrainerDiffRecycle"),
    ("brats", "cpu_2d", "nnUNetTrainer"),
    ("brats", "cpu_2d", "nnUNetTrainerDiffRecycle"),
])
def test_every_preset_trains_and_predicts_on_real_plans(dataset_fixture, preset_name, trainer, request, tmp_path):
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    dataset = request.getfixturevalue(dataset_fixture)
    preset = load_preset(preset_name)
    plans_name = derived_plans_name("nnUNetPlans", preset)
    configurations = _plans(dataset, plans_name)["configurations"]
    parent, derived = configurations[preset["inherits_from"]], configurations[preset["configuration"]]
    kwargs = derived["architecture"]["arch_kwargs"]
    capped = [min(size, median) for size, median in zip(preset["patch_size"], parent["median_image_size_in_voxels"])]
    _, strides, kernels, patch, _ = get_pool_and_conv_props(parent["spacing"], capped, FEATURE_MAP_MIN_EDGE_LENGTH,
                                                            MAX_POOLINGS_PER_AXIS)
    assert derived["patch_size"] == [int(size) for size in patch]
    assert kwargs["strides"] == [list(s) for s in strides] and kwargs["kernel_sizes"] == [list(k) for k in kernels]
    for axis, size in enumerate(derived["patch_size"]):
        assert size % math.prod(stride[axis] for stride in kwargs["strides"]) == 0
        assert size <= max(preset["patch_size"][axis], parent["patch_size"][axis])  # never beyond nnU-Net's own

    with environment(nnUNet_n_proc_DA="0"):
        train(TrainingRun(str(dataset.dataset_id), preset["configuration"], "all", trainer, plans_name,
                          TrainingBudget(1, 1, 1)))
    image = _one_case_input(dataset, tmp_path / "input")
    run(["nnUNetv2_predict", "-i", str(image.parent), "-o", str(tmp_path / "output"), "-d", str(dataset.dataset_id),
         "-c", preset["configuration"], "-p", plans_name, "-tr", trainer, "-f", "all", "-device", "cpu",
         "--disable_tta", "-npp", "0", "-nps", "0"], env={"nnUNet_diffusion_steps": "2"})
    prediction = sitk.ReadImage(str(tmp_path / "output" / image.name.replace("_0000", "")))
    assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
    labels = set(json.loads((dataset.raw / "dataset.json").read_text())["labels"].values())
    assert set(np.unique(sitk.GetArrayFromImage(prediction)).tolist()) <= labels
