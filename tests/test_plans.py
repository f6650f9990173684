"""`nnunet-diffusion plans`: presets derive inheriting configurations, named after their source plans, and never
silently replace existing plans; the derived network is the one nnU-Net's planner builds for the preset's patch,
capped at the median image size, with the configuration's spacing."""
import copy
import json
import math

import pytest
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

from nnunet_diffusion.cli import main as cli_main
from nnunet_diffusion.plans import (PresetOverrides, available_presets, derive_plans, load_preset,
                                    write_preset_plans)

# what nnU-Net's ExperimentPlanner passes to get_pool_and_conv_props
MIN_EDGE, MAX_POOLINGS = 4, 999999
REPLACED_KWARGS = {"n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                   "n_conv_per_stage_decoder", "n_blocks_per_stage"}


PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def _architecture(dims: int, n_stages: int, encoder_key: str = "n_conv_per_stage",
                  encoder_counts: list[int] | None = None, decoder_counts: list[int] | None = None,
                  network: str = PLAIN_UNET) -> dict:
    """The architecture entry as nnU-Net's planners write it (PlainConvUNet unless told otherwise)."""
    return {"network_class_name": network, "arch_kwargs": {
        "n_stages": n_stages, "features_per_stage": [min(32 * 2 ** i, 320) for i in range(n_stages)],
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": [[3] * dims] * n_stages,
        "strides": [[1] * dims] + [[2] * dims] * (n_stages - 1),
        encoder_key: encoder_counts or [2] * n_stages,
        "n_conv_per_stage_decoder": decoder_counts or [2] * (n_stages - 1),
        "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _configuration(dims: int, spacing: list[float] | None = None, median: list[float] | None = None,
                   patch: list[int] | None = None, n_stages: int = 4, architecture: dict | None = None) -> dict:
    return {"data_identifier": f"nnUNetPlans_{dims}d", "batch_size": 2, "patch_size": patch or [64] * dims,
            "median_image_size_in_voxels": median or [128.0] * dims, "spacing": spacing or [1.0] * dims,
            "architecture": architecture or _architecture(dims, n_stages)}


def _plans(name: str = "nnUNetPlans", **configurations) -> dict:
    return {"plans_name": name, "dataset_name": "Dataset001_X",
            "configurations": configurations or {"2d": _configuration(2), "3d_fullres": _configuration(3)}}


def _acdc_like_plans() -> dict:
    """ACDC's planned shapes: 10 x 1.5 x 1.5 mm, 9 slices at the median, 6-stage 2d and 3d_fullres networks."""
    fullres = _configuration(3, [10.0, 1.5, 1.5], [9.0, 256.0, 216.0], [10, 256, 224], 6)
    fullres["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2],
                                                         [1, 2, 2]]
    return _plans(**{"2d": _configuration(2, [1.5, 1.5], [256.0, 216.0], [256, 224], 6), "3d_fullres": fullres})


def _nnunet_plan(spacing: list[float], patch: list[float]) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Patch, strides and kernel sizes nnU-Net's get_pool_and_conv_props plans for `patch`."""
    _, strides, kernels, planned_patch, _ = get_pool_and_conv_props(spacing, patch, MIN_EDGE, MAX_POOLINGS)
    return [int(p) for p in planned_patch], [list(s) for s in strides], [list(k) for k in kernels]


def _derived(plans: dict, preset_name: str, overrides: PresetOverrides = PresetOverrides()) -> dict:
    preset = overrides.apply(load_preset(preset_name))
    return derive_plans(plans, preset)["configurations"][preset["configuration"]]


def _assert_consistent_unet(configuration: dict) -> None:
    """The plain invariants of a U-Net nnU-Net can train: one stride, kernel and count per stage, first stride 1,
    patch divisible by the total stride on every axis."""
    kwargs = configuration["architecture"]["arch_kwargs"]
    n_stages = kwargs["n_stages"]
    assert len(kwargs["strides"]) == len(kwargs["kernel_sizes"]) == len(kwargs["features_per_stage"]) == n_stages
    assert kwargs["strides"][0] == [1] * len(configuration["patch_size"])
    for axis, size in enumerate(configuration["patch_size"]):
        assert size % math.prod(stride[axis] for stride in kwargs["strides"]) == 0
    encoder = kwargs.get("n_conv_per_stage", kwargs.get("n_blocks_per_stage"))
    assert len(encoder) == n_stages and len(kwargs["n_conv_per_stage_decoder"]) == n_stages - 1


@pytest.fixture
def folder(tmp_path):
    for name in ("nnUNetPlans", "nnUNetResEncUNetMPlans"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_plans(name)))
    return tmp_path


def test_every_preset_derives_a_valid_configuration_of_its_parent():
    for name in available_presets():
        preset = load_preset(name)
        for plans in (_plans(), _acdc_like_plans()):
            configuration = derive_plans(plans, preset)["configurations"][preset["configuration"]]
            assert configuration["inherits_from"] == preset["inherits_from"]
            assert configuration["batch_size"] == preset["batch_size"]
            assert len(configuration["patch_size"]) == len(plans["configurations"][preset["inherits_from"]]["spacing"])
            assert configuration["architecture"]["arch_kwargs"]["features_per_stage"][0] == preset["base_features"]
            _assert_consistent_unet(configuration)


def test_the_topology_is_what_nnunet_plans_for_the_preset_patch():
    configuration = _derived(_plans(), "cpu_tiny")
    patch, strides, kernels = _nnunet_plan([1.0] * 3, [32] * 3)
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert (configuration["patch_size"], kwargs["strides"], kwargs["kernel_sizes"]) == (patch, strides, kernels)
    assert kwargs["n_stages"] == len(strides) and kwargs["features_per_stage"] == [8, 16, 32, 64][:len(strides)]


def test_the_2d_preset_fits_a_six_stage_parent_it_used_to_fail_on():
    """ACDC's 2d plan pools 5 times (total stride 32); an 80 x 80 patch gets its own, shallower network."""
    configuration = _derived(_acdc_like_plans(), "cpu_2d")
    patch, strides, kernels = _nnunet_plan([1.5, 1.5], [80, 80])
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert configuration["inherits_from"] == "2d" and configuration["patch_size"] == patch == [80, 80]
    assert kwargs["strides"] == strides and kwargs["kernel_sizes"] == kernels and kwargs["n_stages"] == 5 < 6
    assert kwargs["features_per_stage"] == [8, 16, 32, 64, 64]
    assert kwargs["n_conv_per_stage"] == [2] * 5 and kwargs["n_conv_per_stage_decoder"] == [2] * 4
    _assert_consistent_unet(configuration)


def test_a_thick_slice_axis_is_capped_at_the_median_and_pooled_late_as_nnunet_does():
    """ACDC's 3d_fullres: 10 mm slices, 9 at the median. A 32^3 patch would span 320 mm along them."""
    configuration = _derived(_acdc_like_plans(), "cpu_tiny")
    patch, strides, kernels = _nnunet_plan([10.0, 1.5, 1.5], [9.0, 32, 32])
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert (configuration["patch_size"], kwargs["strides"], kwargs["kernel_sizes"]) == (patch, strides, kernels)
    assert configuration["patch_size"][0] < 32 and configuration["patch_size"][1:] == [32, 32]
    assert kwargs["strides"][1][0] == 1 and kwargs["strides"][1][1:] == [2, 2]  # in-plane first
    assert kwargs["kernel_sizes"][0][0] == 1  # no convolution across 10 mm slices at full resolution
    _assert_consistent_unet(configuration)


def test_a_patch_larger_than_the_median_image_is_capped_there_first():
    plans = _plans(**{"3d_fullres": _configuration(3, median=[20.0, 24.0, 18.0], patch=[24, 24, 24])})
    configuration = _derived(plans, "cpu_small")
    assert configuration["patch_size"] == _nnunet_plan([1.0] * 3, [20.0, 24.0, 18.0])[0]
    assert all(size < 48 for size in configuration["patch_size"])
    _assert_consistent_unet(configuration)


def test_odd_median_sizes_give_the_patch_nnunet_pads_them_to():
    """MSD Hippocampus: median 36 x 50 x 35 voxels at 1 mm."""
    plans = _plans(**{"3d_fullres": _configuration(3, median=[36.0, 50.0, 35.0], patch=[40, 56, 40])})
    configuration = _derived(plans, "cpu_small")
    patch, strides, kernels = _nnunet_plan([1.0] * 3, [36.0, 48, 35.0])
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert (configuration["patch_size"], kwargs["strides"], kwargs["kernel_sizes"]) == (patch, strides, kernels)
    assert configuration["patch_size"][2] % 2 == 0 and configuration["patch_size"][2] >= 35
    _assert_consistent_unet(configuration)


def test_only_the_stage_dependent_arch_kwargs_change():
    parent = _acdc_like_plans()["configurations"]["3d_fullres"]["architecture"]
    derived = _derived(_acdc_like_plans(), "cpu_small")["architecture"]
    assert derived["network_class_name"] == parent["network_class_name"]
    assert derived["_kw_requires_import"] == parent["_kw_requires_import"]
    assert set(derived["arch_kwargs"]) == set(parent["arch_kwargs"])
    assert {k: v for k, v in derived["arch_kwargs"].items() if k not in REPLACED_KWARGS} == \
        {k: v for k, v in parent["arch_kwargs"].items() if k not in REPLACED_KWARGS}


@pytest.mark.parametrize("parent_stages, blocks, expected_blocks", [
    (6, [1, 3, 4, 6, 6, 6], [1, 3, 4, 6]),  # fewer stages: nnU-Net's ResEnc prefix
    (3, [1, 3, 4], [1, 3, 4, 4]),  # more stages: the last count repeats
])
def test_a_resenc_parent_keeps_its_block_counts_per_stage(parent_stages, blocks, expected_blocks):
    architecture = _architecture(3, parent_stages, "n_blocks_per_stage", blocks, [1] * (parent_stages - 1),
                                 RESENC_UNET)
    plans = _plans(**{"3d_fullres": _configuration(3, architecture=architecture)})
    kwargs = _derived(plans, "cpu_tiny")["architecture"]["arch_kwargs"]
    assert kwargs["n_stages"] == 4 and "n_conv_per_stage" not in kwargs
    assert kwargs["n_blocks_per_stage"] == expected_blocks and kwargs["n_conv_per_stage_decoder"] == [1, 1, 1]


def test_the_derived_networks_build_and_map_a_patch_to_a_patch(one_torch_thread):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    resenc = _architecture(3, 5, "n_blocks_per_stage", [1, 3, 4, 6, 6], [1] * 4, RESENC_UNET)
    cases = [(_acdc_like_plans(), "cpu_tiny"), (_acdc_like_plans(), "cpu_2d"),
             (_plans(**{"3d_fullres": _configuration(3, median=[36.0, 50.0, 35.0], architecture=resenc)}),
              "cpu_tiny")]
    for plans, preset in cases:
        configuration = _derived(plans, preset)
        architecture = configuration["architecture"]
        network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                         architecture["_kw_requires_import"], 1, 3, deep_supervision=False)
        with torch.no_grad():
            output = network(torch.zeros(1, 1, *configuration["patch_size"]))
        assert list(output.shape) == [1, 3, *configuration["patch_size"]]


def test_overrides_replace_the_preset_for_one_run():
    overrides = PresetOverrides(patch_size=(8, 64, 64), batch_size=4, base_features=16, max_features=32)
    configuration = _derived(_acdc_like_plans(), "cpu_tiny", overrides)
    patch, strides, _ = _nnunet_plan([10.0, 1.5, 1.5], [8, 64, 64])
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert configuration["patch_size"] == patch and kwargs["strides"] == strides and configuration["batch_size"] == 4
    assert kwargs["features_per_stage"] == [min(16 * 2 ** i, 32) for i in range(len(strides))]
    assert PresetOverrides().apply(load_preset("cpu_tiny")) == load_preset("cpu_tiny")


@pytest.mark.parametrize("overrides, message", [
    (PresetOverrides(patch_size=(80, 80, 80)), r"patch size \[80, 80, 80\] has 3 axes but 2d is 2D; give 2 sizes"),
    (PresetOverrides(patch_size=(0, 80)), r"positive whole numbers"),
    (PresetOverrides(patch_size=(4, 4)), r"leaves no axis to downsample.*at least 8 voxels"),
    (PresetOverrides(batch_size=0), r"batch size must be a whole number of at least 1, got 0"),
    (PresetOverrides(base_features=0), r"base features must be .* at least 1, got 0 \(--features\)"),
    (PresetOverrides(base_features=128), r"max features 64 must be .* at least the base features 128; pass "
                                         r"--max-features 128 or more"),
])
def test_bad_overrides_say_what_would_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        _derived(_acdc_like_plans(), "cpu_2d", overrides)


def test_a_parent_without_spacing_or_median_size_is_refused():
    configuration = _configuration(3)
    del configuration["spacing"], configuration["median_image_size_in_voxels"]
    with pytest.raises(ValueError, match="has no spacing, median_image_size_in_voxels.*nnUNetv2_plan_experiment"):
        _derived(_plans(**{"3d_fullres": configuration}), "cpu_tiny")


def test_an_architecture_without_unet_stages_is_refused():
    configuration = _configuration(3)
    configuration["architecture"] = {"network_class_name": "my.Transformer", "arch_kwargs": {"depth": 12}}
    with pytest.raises(ValueError, match="my.Transformer has no n_stages.*PlainConvUNet, ResidualEncoderUNet"):
        _derived(_plans(**{"3d_fullres": configuration}), "cpu_tiny")


def test_a_parent_that_inherits_is_resolved_as_nnunet_resolves_it():
    plans = _acdc_like_plans()
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    preset = {**load_preset("cpu_tiny"), "inherits_from": "3d_cascade_fullres"}
    configuration = derive_plans(plans, preset)["configurations"]["3d_cpu"]
    assert configuration["patch_size"] == _derived(_acdc_like_plans(), "cpu_tiny")["patch_size"]


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


def test_an_override_that_changes_written_plans_needs_force(folder):
    write_preset_plans(folder, "cpu_tiny")
    with pytest.raises(FileExistsError, match="--force.*--plans-name"):
        write_preset_plans(folder, "cpu_tiny", overrides=PresetOverrides(batch_size=4))
    written = write_preset_plans(folder, "cpu_tiny", force=True, overrides=PresetOverrides(batch_size=4))
    assert json.loads(written.read_text())["configurations"]["3d_cpu"]["batch_size"] == 4


@pytest.fixture
def dataset_folder(folder, monkeypatch):
    dataset = folder / "Dataset001_X"
    dataset.mkdir()
    (dataset / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    monkeypatch.setattr("nnunetv2.paths.nnUNet_preprocessed", str(folder))
    return dataset


def test_the_plans_command_refuses_with_a_one_line_message(dataset_folder):
    conflicting = copy.deepcopy(_plans("nnUNetPlansCPU"))
    conflicting["configurations"]["3d_cpu"] = {"inherits_from": "3d_fullres", "patch_size": [16, 16, 16]}
    (dataset_folder / "nnUNetPlansCPU.json").write_text(json.dumps(conflicting))
    with pytest.raises(SystemExit, match="nnunet-diffusion plans: .*exists and differs.*--force"):
        cli_main(["plans", "Dataset001_X", "--preset", "cpu_tiny"])
    with pytest.raises(SystemExit, match="would overwrite the source plans"):
        cli_main(["plans", "Dataset001_X", "--preset", "cpu_tiny", "--plans-name", "nnUNetPlans"])
    assert cli_main(["plans", "Dataset001_X", "--preset", "cpu_tiny", "--force"]) == 0


def test_the_plans_command_takes_overrides_and_prints_the_topology(dataset_folder, capsys):
    with pytest.raises(SystemExit, match=r"nnunet-diffusion plans: patch size \[80, 80, 80\] has 3 axes but 2d"):
        cli_main(["plans", "Dataset001_X", "--preset", "cpu_2d", "--patch-size", "80", "80", "80"])
    assert not (dataset_folder / "nnUNetPlansCPU.json").exists()
    assert cli_main(["plans", "Dataset001_X", "--preset", "cpu_2d", "--patch-size", "64", "48", "--batch-size",
                     "6", "--features", "4", "--max-features", "16"]) == 0
    path, summary = capsys.readouterr().out.splitlines()
    configuration = json.loads(open(path).read())["configurations"]["2d_cpu"]
    assert configuration["patch_size"] == [64, 48] and configuration["batch_size"] == 6
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 16, 16][
        :configuration["architecture"]["arch_kwargs"]["n_stages"]]
    assert summary.startswith("2d_cpu: patch 64x48, batch 6, ")
