"""`nnunet-diffusion plans`: presets derive inheriting configurations, named after their source plans, and never
silently replace existing plans."""
import copy
import json

import pytest

from nnunet_diffusion.cli import main as cli_main
from nnunet_diffusion.plans import available_presets, derive_plans, load_preset, write_preset_plans


def _configuration(dims: int) -> dict:
    return {"patch_size": [64] * dims, "batch_size": 2, "data_identifier": f"nnUNetPlans_{dims}d",
            "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {
                "n_stages": 4, "features_per_stage": [32, 64, 128, 256],
                "strides": [[1] * dims] + [[2] * dims] * 3}}}


def _plans(name: str = "nnUNetPlans") -> dict:
    return {"plans_name": name, "dataset_name": "Dataset001_X",
            "configurations": {"2d": _configuration(2), "3d_fullres": _configuration(3)}}


@pytest.fixture
def folder(tmp_path):
    for name in ("nnUNetPlans", "nnUNetResEncUNetMPlans"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_plans(name)))
    return tmp_path


def test_every_preset_derives_a_valid_configuration_of_its_parent():
    for name in available_presets():
        preset = load_preset(name)
        derived = derive_plans(_plans(), preset)
        configuration = derived["configurations"][preset["configuration"]]
        assert configuration["inherits_from"] == preset["inherits_from"]
        assert len(configuration["patch_size"]) == len(_plans()["configurations"][preset["inherits_from"]]["patch_size"])
        assert configuration["architecture"]["arch_kwargs"]["features_per_stage"][0] == preset["base_features"]


def test_the_2d_preset_inherits_from_2d_with_nnunets_patch_and_batch():
    preset = load_preset("cpu_2d")
    configuration = derive_plans(_plans(), preset)["configurations"]["2d_cpu"]
    assert configuration["inherits_from"] == "2d" and configuration["patch_size"] == [80, 80]
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64]


def test_the_written_plans_are_named_after_the_source(folder):
    assert write_preset_plans(folder, "cpu_tiny").name == "nnUNetPlansCPU.json"
    written = write_preset_plans(folder, "cpu_tiny", "nnUNetResEncUNetMPlans")
    assert written.name == "nnUNetResEncUNetMPlansCPU.json"
    assert json.loads(written.read_text())["plans_name"] == "nnUNetResEncUNetMPlansCPU"
    assert json.loads((folder / "nnUNetPlansCPU.json").read_text())["plans_name"] == "nnUNetPlansCPU"  # untouched
    assert write_preset_plans(folder, "cpu_tiny", plans_name="MyPlans").name == "MyPlans.json"


def test_presets_of_the_same_source_add_up_and_a_rerun_changes_nothing(folder):
    write_preset_plans(folder, "cpu_tiny")
    first = (folder / "nnUNetPlansCPU.json").read_text()
    write_preset_plans(folder, "cpu_tiny")
    assert (folder / "nnUNetPlansCPU.json").read_text() == first
    write_preset_plans(folder, "cpu_2d")
    configurations = json.loads((folder / "nnUNetPlansCPU.json").read_text())["configurations"]
    assert {"3d_cpu", "2d_cpu"} <= set(configurations)


def test_conflicting_plans_are_replaced_only_with_force(folder):
    write_preset_plans(folder, "cpu_tiny")
    other = _plans()
    other["configurations"]["3d_fullres"]["batch_size"] = 7  # the source was re-planned since
    (folder / "nnUNetPlans.json").write_text(json.dumps(other))
    before = (folder / "nnUNetPlansCPU.json").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        write_preset_plans(folder, "cpu_tiny")
    assert (folder / "nnUNetPlansCPU.json").read_text() == before
    write_preset_plans(folder, "cpu_tiny", force=True)
    assert json.loads((folder / "nnUNetPlansCPU.json").read_text())["configurations"]["3d_fullres"]["batch_size"] == 7
    assert not list(folder.glob("*.partial"))


def test_the_plans_command_refuses_with_a_one_line_message(folder, monkeypatch):
    dataset = folder / "Dataset001_X"
    dataset.mkdir()
    (dataset / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    conflicting = copy.deepcopy(_plans("nnUNetPlansCPU"))
    conflicting["configurations"]["3d_cpu"] = {"inherits_from": "3d_fullres", "patch_size": [16, 16, 16]}
    (dataset / "nnUNetPlansCPU.json").write_text(json.dumps(conflicting))
    monkeypatch.setattr("nnunetv2.paths.nnUNet_preprocessed", str(folder))
    with pytest.raises(SystemExit, match="nnunet-diffusion plans: .*exists and differs.*--force"):
        cli_main(["plans", "Dataset001_X", "--preset", "cpu_tiny"])
    with pytest.raises(SystemExit, match="would overwrite the source plans"):
        cli_main(["plans", "Dataset001_X", "--preset", "cpu_tiny", "--plans-name", "nnUNetPlans"])
    assert cli_main(["plans", "Dataset001_X", "--preset", "cpu_tiny", "--force"]) == 0
