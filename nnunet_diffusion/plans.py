"""Derive small inheriting configurations from a dataset's nnU-Net plans, using the presets in
`nnunet_diffusion/presets/`.

An inheriting configuration reuses the parent's preprocessed data (same `data_identifier`), so a CPU-sized
variant costs no re-preprocessing. The preset sets patch size, batch size and feature widths; the patch is fitted
to the dataset and the network's stages, strides and kernel sizes are planned for it by nnU-Net's own topology
function, with the parent configuration's spacing, as nnU-Net's planner would for that patch.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from nnunet_diffusion.environment import plugin_command

# what nnU-Net's ExperimentPlanner passes to get_pool_and_conv_props: bottleneck feature maps at least 4 voxels
# on an axis (UNet_featuremap_min_edge_length), and no other limit on the number of poolings per axis
FEATURE_MAP_MIN_EDGE_LENGTH = 4
MAX_POOLINGS_PER_AXIS = 999999

# arch_kwargs with one entry per stage (encoder: n_stages, decoder: n_stages - 1), as nnU-Net's planners write
# them: PlainConvUNet has n_conv_per_stage, ResidualEncoderUNet n_blocks_per_stage
PER_STAGE_ENCODER_KEYS = ("n_conv_per_stage", "n_blocks_per_stage")
PER_STAGE_DECODER_KEYS = ("n_conv_per_stage_decoder",)

ADAPTATION_HELP = """\
how a preset adapts to the dataset:
  The preset's patch is first capped, axis by axis, at the parent configuration's median image size
  (median_image_size_in_voxels), as nnU-Net caps its initial patch. nnU-Net's get_pool_and_conv_props then
  plans the U-Net for that patch with the configuration's spacing: an axis is pooled while its feature maps keep
  at least 4 voxels and its spacing is within a factor 2 of the finest one (so a thick-slice axis is pooled
  later, or never), kernels are 1 along axes still too coarse, and the patch is padded up to a multiple of the
  total stride. n_stages, strides, kernel sizes, the per-stage conv (or block) counts and features_per_stage
  (base features doubling up to max features) follow; every other architecture setting is the parent's.

  --patch-size, --batch-size, --features and --max-features replace the preset's values for one run. A
  configuration that differs from one written before under the same plans name needs --force or --plans-name.
"""


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("nnunet_diffusion.presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    presets = available_presets()
    if name not in presets:
        raise ValueError(f"unknown plans preset {name!r}; available: {', '.join(presets)}")
    return json.loads(resources.files("nnunet_diffusion.presets").joinpath(f"{name}.json").read_text())


@dataclass(frozen=True)
class PresetOverrides:
    """Values that replace a preset's for one run (None keeps the preset's); checked when the plans are derived,
    where the configuration's number of axes is known."""
    patch_size: tuple[int, ...] | None = None
    batch_size: int | None = None
    base_features: int | None = None
    max_features: int | None = None

    def apply(self, preset: dict) -> dict:
        values = {"patch_size": None if self.patch_size is None else list(self.patch_size),
                  "batch_size": self.batch_size, "base_features": self.base_features,
                  "max_features": self.max_features}
        return {**preset, **{key: value for key, value in values.items() if value is not None}}


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_preset_values(preset: dict, dims: int, configuration: str) -> None:
    """ValueError, saying what would work, unless patch, batch and features fit a `dims`-axis configuration."""
    patch = preset["patch_size"]
    example = " ".join(["80"] * dims) if dims == 2 else " ".join(["32"] * dims)
    if len(patch) != dims:
        raise ValueError(f"patch size {patch} has {len(patch)} axes but {configuration} is {dims}D; give {dims} "
                         f"sizes, e.g. --patch-size {example}")
    if not all(_is_positive_int(size) for size in patch):
        raise ValueError(f"patch size {patch} must be positive whole numbers of voxels, e.g. --patch-size {example}")
    if not _is_positive_int(preset["batch_size"]):
        raise ValueError(f"batch size must be a whole number of at least 1, got {preset['batch_size']} "
                         f"(--batch-size)")
    base, top = preset["base_features"], preset["max_features"]
    if not _is_positive_int(base):
        raise ValueError(f"base features must be a whole number of at least 1, got {base} (--features)")
    if not _is_positive_int(top) or top < base:
        raise ValueError(f"max features {top} must be a whole number of at least the base features {base}; "
                         f"pass --max-features {base} or more")


def nnunet_topology(spacing: Sequence[float], median_image_size: Sequence[float], patch_size: Sequence[int]
                    ) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Patch, strides and kernel sizes of the U-Net nnU-Net's planner builds for `patch_size`: capped at the median
    image size first (a patch larger than the images only pads), then `get_pool_and_conv_props`, which may pad
    the patch to a multiple of the total stride."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    capped = [min(size, median) for size, median in zip(patch_size, median_image_size[:len(spacing)])]
    _, strides, kernel_sizes, patch, _ = get_pool_and_conv_props(spacing, capped, FEATURE_MAP_MIN_EDGE_LENGTH,
                                                                 MAX_POOLINGS_PER_AXIS)
    return ([int(size) for size in patch], [[int(s) for s in stage] for stage in strides],
            [[int(k) for k in stage] for stage in kernel_sizes])


def _per_stage(values: list, length: int) -> list:
    """A parent's per-stage list fitted to `length` stages: its first values, the last one repeated for extra
    stages (nnU-Net's planners take prefixes of sequences whose tails repeat, e.g. ResEnc's 1, 3, 4, 6, 6, …)."""
    return values[:length] + values[-1:] * (length - len(values))


def resized_architecture(architecture: dict, strides: list[list[int]], kernel_sizes: list[list[int]],
                         base_features: int, max_features: int) -> dict:
    """The parent's architecture with the stage-dependent arch_kwargs set for the new topology; conv_op,
    norm_op and every other setting nnU-Net planned stay."""
    kwargs = architecture["arch_kwargs"]
    missing = [key for key in ("n_stages", "features_per_stage", "kernel_sizes", "strides") if key not in kwargs]
    if missing:
        raise ValueError(f"{architecture.get('network_class_name')} has no {', '.join(missing)} in its arch_kwargs; "
                         f"presets resize the U-Nets nnU-Net's planners write (PlainConvUNet, ResidualEncoderUNet)")
    resized = copy.deepcopy(architecture)
    n_stages = len(strides)
    resized["arch_kwargs"].update(
        n_stages=n_stages, strides=strides, kernel_sizes=kernel_sizes,
        features_per_stage=[min(base_features * 2 ** stage, max_features) for stage in range(n_stages)])
    for keys, length in ((PER_STAGE_ENCODER_KEYS, n_stages), (PER_STAGE_DECODER_KEYS, n_stages - 1)):
        for key in keys:
            if isinstance(kwargs.get(key), list):
                resized["arch_kwargs"][key] = _per_stage(kwargs[key], length)
    return resized


def derive_plans(plans: dict, preset: dict, plans_name: str | None = None) -> dict:
    """A copy of `plans` named `plans_name` (default: the source's name + the preset's suffix, e.g.
    nnUNetPlans → nnUNetPlansCPU) with one extra configuration built from the preset for this dataset."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    parent_name = preset["inherits_from"]
    if parent_name not in plans["configurations"]:
        raise ValueError(f"the plans have no configuration {parent_name!r} to inherit from "
                         f"(found {', '.join(plans['configurations'])}); run nnUNetv2_plan_and_preprocess with "
                         f"-c {parent_name} first")
    parent = PlansManager(plans).get_configuration(parent_name).configuration
    missing = [key for key in ("spacing", "median_image_size_in_voxels") if key not in parent]
    if missing:
        raise ValueError(f"configuration {parent_name!r} of {plans['plans_name']} has no {', '.join(missing)}, "
                         f"which nnU-Net's planner writes and the preset needs to fit the patch to the dataset; "
                         f"re-plan with nnUNetv2_plan_experiment")
    check_preset_values(preset, len(parent["spacing"]), parent_name)
    patch, strides, kernel_sizes = nnunet_topology(parent["spacing"], parent["median_image_size_in_voxels"],
                                                   preset["patch_size"])
    if len(strides) < 2:
        raise ValueError(f"patch size {preset['patch_size']} (capped at the median image size "
                         f"{parent['median_image_size_in_voxels']}) leaves no axis to downsample: nnU-Net pools an "
                         f"axis only while its feature maps keep {FEATURE_MAP_MIN_EDGE_LENGTH} voxels; give at least "
                         f"{2 * FEATURE_MAP_MIN_EDGE_LENGTH} voxels on the finest-spacing axes (--patch-size)")
    derived = copy.deepcopy(plans)
    derived["plans_name"] = plans_name or derived_plans_name(plans["plans_name"], preset)
    derived["configurations"][preset["configuration"]] = {
        "inherits_from": parent_name, "patch_size": patch, "batch_size": preset["batch_size"],
        "architecture": resized_architecture(parent["architecture"], strides, kernel_sizes,
                                             preset["base_features"], preset["max_features"])}
    return derived


def describe_configuration(plans: dict, configuration: str) -> str:
    """One line with what a derived configuration trains: patch, batch and the planned topology."""
    settings = plans["configurations"][configuration]
    kwargs = settings["architecture"]["arch_kwargs"]

    def axes(values: Sequence[int]) -> str:
        return "x".join(str(v) for v in values)

    return (f"{configuration}: patch {axes(settings['patch_size'])}, batch {settings['batch_size']}, "
            f"{kwargs['n_stages']} stages, strides {' '.join(axes(s) for s in kwargs['strides'])}, kernels "
            f"{' '.join(axes(k) for k in kwargs['kernel_sizes'])}, "
            f"features {'-'.join(str(f) for f in kwargs['features_per_stage'])}")


def derived_plans_name(source_plans: str, preset: dict) -> str:
    """The plans identifier a preset writes by default: the source's with the preset's suffix."""
    return f"{source_plans}{preset['plans_suffix']}"


def merge_into_existing(existing: dict, derived: dict, configuration: str, target: Path) -> dict:
    """`existing` with the derived configuration added, when both come from the same source plans; otherwise
    an error, so that plans (and the results folders named after them) are never silently replaced."""
    def without_configurations(plans: dict) -> dict:
        return {k: v for k, v in plans.items() if k != "configurations"}

    source_configurations = {k: v for k, v in derived["configurations"].items() if k != configuration}
    same_source = without_configurations(existing) == without_configurations(derived) and \
        all(existing["configurations"].get(k) == v for k, v in source_configurations.items())
    ours = derived["configurations"][configuration]
    if same_source and existing["configurations"].get(configuration, ours) == ours:
        merged = copy.deepcopy(existing)
        merged["configurations"][configuration] = ours
        return merged
    raise FileExistsError(f"{target} exists and differs from what this preset derives (other source plans, or "
                          f"another {configuration!r}); pass --force to replace it, or --plans-name NAME to write "
                          f"new plans beside it")


def write_preset_plans(preprocessed_dataset_folder: str | Path, preset_name: str,
                       source_plans: str = "nnUNetPlans", plans_name: str | None = None, force: bool = False,
                       overrides: PresetOverrides = PresetOverrides()) -> Path:
    """Write `<plans_name>.json` next to `<source_plans>.json` in a preprocessed dataset folder.

    An existing file of that name keeps its other configurations (presets of the same source add up, e.g.
    3d_cpu and 2d_cpu in nnUNetPlansCPU); a conflicting one is replaced only with `force`.
    """
    folder = Path(preprocessed_dataset_folder)
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; run nnUNetv2_plan_and_preprocess for this dataset first")
    preset = overrides.apply(load_preset(preset_name))
    plans_name = plans_name or derived_plans_name(source_plans, preset)
    if plans_name == source_plans:
        raise ValueError(f"--plans-name {plans_name} would overwrite the source plans; choose another name")
    target = folder / f"{plans_name}.json"
    derived = derive_plans(json.loads(source.read_text()), preset, plans_name)
    if target.is_file() and not force:
        derived = merge_into_existing(json.loads(target.read_text()), derived, preset["configuration"], target)
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(derived, indent=2))
    partial.replace(target)
    return target


def plan_and_preprocess_with_preset(dataset_id: int, preset_name: str, preprocessed_root: str | Path,
                                    run: Callable[[list[str]], object], processes: int = 2,
                                    overrides: PresetOverrides = PresetOverrides()) -> Path:
    """nnU-Net plans and preprocesses a raw dataset for the configuration the preset inherits from (checking the
    dataset first), then the preset's plans (with `overrides`) are written beside nnU-Net's; returns their file.
    `run` executes the command as the caller logs it (and must raise when it fails)."""
    configuration = load_preset(preset_name)["inherits_from"]
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", str(processes),
         "-npfp", str(processes), "--verify_dataset_integrity"])
    return write_preset_plans(_preprocessed_folder(preprocessed_root, dataset_id, "nnUNetv2_plan_and_preprocess"),
                              preset_name, overrides=overrides)


def preprocess_with_plans_of(source_id: int, target_id: int, preset_name: str, preprocessed_root: str | Path,
                             run: Callable[[list[str]], object], processes: int = 2) -> Path:
    """The target dataset preprocessed with the source dataset's nnUNetPlans, as docs/pretraining.md (section 5)
    does it for a probe dataset: nnU-Net plans the target for its fingerprint only (`--no_pp`), copies the source's
    plans over the target's (`nnUNetv2_move_plans_between_datasets`), preprocesses with them, and the preset is
    derived from the copied plans, so that a network pretrained on the source fits the target's. Returns the
    target's preset plans file; `run` executes each command as for `plan_and_preprocess_with_preset`."""
    configuration = load_preset(preset_name)["inherits_from"]
    run(["nnUNetv2_plan_and_preprocess", "-d", str(target_id), "-c", configuration, "-npfp", str(processes),
         "--no_pp"])
    run(["nnUNetv2_move_plans_between_datasets", "-s", str(source_id), "-t", str(target_id), "-sp", "nnUNetPlans",
         "-tp", "nnUNetPlans"])
    run(["nnUNetv2_preprocess", "-d", str(target_id), "-plans_name", "nnUNetPlans", "-c", configuration, "-np",
         str(processes)])
    return write_preset_plans(_preprocessed_folder(preprocessed_root, target_id, "nnUNetv2_preprocess"), preset_name)


def _preprocessed_folder(preprocessed_root: str | Path, dataset_id: int, command: str) -> Path:
    folders = sorted(Path(preprocessed_root).glob(f"Dataset{dataset_id:03d}_*"))
    if len(folders) != 1:
        raise FileNotFoundError(f"expected one preprocessed folder Dataset{dataset_id:03d}_* in {preprocessed_root} "
                                f"after {command}, found {len(folders)}")
    return folders[0]


def main(argv: list[str]) -> int:
    """`nnunet-diffusion plans`."""
    parser = argparse.ArgumentParser(
        prog="nnunet-diffusion plans", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="write a CPU-sized inheriting configuration from a plans preset, fitted to the dataset: the "
                    "patch is capped at the median image size and nnU-Net plans the network's stages, strides and "
                    "kernel sizes for it", epilog=ADAPTATION_HELP)
    parser.add_argument("dataset", help="dataset id or name, e.g. 990 or Dataset990_DiffusionDemo")
    parser.add_argument("--preset", default="cpu_tiny", choices=available_presets())
    parser.add_argument("--source-plans", default="nnUNetPlans", help="plans identifier to derive from")
    parser.add_argument("--plans-name", help="identifier of the written plans (default: the source's + the "
                        "preset's suffix, e.g. nnUNetPlansCPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing plans file that conflicts")
    parser.add_argument("--patch-size", type=int, nargs="+", metavar="N",
                        help="patch size in voxels, one per axis of the configuration (e.g. 32 64 64), instead of "
                        "the preset's")
    parser.add_argument("--batch-size", type=int, metavar="N", help="batch size instead of the preset's")
    parser.add_argument("--features", type=int, metavar="N", help="features of the first stage instead of the "
                        "preset's; they double per stage up to --max-features")
    parser.add_argument("--max-features", type=int, metavar="N", help="features cap instead of the preset's")
    args = parser.parse_args(argv)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed:
        raise SystemExit("nnUNet_preprocessed is not set; export it as for nnUNetv2_train")
    folder = f"{nnUNet_preprocessed}/{maybe_convert_to_dataset_name(args.dataset)}"
    overrides = PresetOverrides(None if args.patch_size is None else tuple(args.patch_size), args.batch_size,
                                args.features, args.max_features)
    with plugin_command("plans", FileExistsError, FileNotFoundError, ValueError):
        target = write_preset_plans(folder, args.preset, args.source_plans, args.plans_name, args.force, overrides)
        print(target)
        print(describe_configuration(json.loads(target.read_text()), load_preset(args.preset)["configuration"]))
    return 0
