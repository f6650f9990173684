"""Derive small inheriting configurations from a dataset's nnU-Net plans, using the presets in
`nnunet_diffusion/presets/`.

An inheriting configuration reuses the parent's preprocessed data (same `data_identifier`), so a CPU-sized
variant costs no re-preprocessing; only patch size, batch size and feature widths change.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from importlib import resources
from pathlib import Path
from typing import Callable

from nnunet_diffusion.environment import plugin_command


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("nnunet_diffusion.presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    presets = available_presets()
    if name not in presets:
        raise ValueError(f"unknown plans preset {name!r}; available: {', '.join(presets)}")
    return json.loads(resources.files("nnunet_diffusion.presets").joinpath(f"{name}.json").read_text())


def derive_plans(plans: dict, preset: dict, plans_name: str | None = None) -> dict:
    """A copy of `plans` named `plans_name` (default: the source's name + the preset's suffix, e.g.
    nnUNetPlans → nnUNetPlansCPU) with one extra configuration built from the preset."""
    parent_name = preset["inherits_from"]
    if parent_name not in plans["configurations"]:
        raise ValueError(f"the plans have no configuration {parent_name!r} to inherit from "
                         f"(found {', '.join(plans['configurations'])}); run nnUNetv2_plan_and_preprocess with "
                         f"-c {parent_name} first")
    parent = plans["configurations"][parent_name]
    while "inherits_from" in parent:
        parent = {**plans["configurations"][parent["inherits_from"]], **parent}
    architecture = copy.deepcopy(parent["architecture"])
    kwargs = architecture["arch_kwargs"]
    strides = kwargs["strides"]
    patch = preset["patch_size"]
    if len(patch) != len(parent["patch_size"]):
        raise ValueError(f"preset patch size {patch} has {len(patch)} axes but {parent_name} has "
                         f"{len(parent['patch_size'])}")
    for axis, size in enumerate(patch):
        factor = math.prod(s[axis] if isinstance(s, (list, tuple)) else s for s in strides)
        if size % factor:
            raise ValueError(f"preset patch size {patch} is not divisible by the network's total stride {factor} "
                             f"on axis {axis}; choose a multiple of {factor}")
    kwargs["features_per_stage"] = [min(preset["base_features"] * 2 ** i, preset["max_features"])
                                     for i in range(kwargs["n_stages"])]
    derived = copy.deepcopy(plans)
    derived["plans_name"] = plans_name or derived_plans_name(plans["plans_name"], preset)
    derived["configurations"][preset["configuration"]] = {
        "inherits_from": parent_name, "patch_size": patch, "batch_size": preset["batch_size"],
        "architecture": architecture}
    return derived


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
                       source_plans: str = "nnUNetPlans", plans_name: str | None = None, force: bool = False) -> Path:
    """Write `<plans_name>.json` next to `<source_plans>.json` in a preprocessed dataset folder.

    An existing file of that name keeps its other configurations (presets of the same source add up, e.g.
    3d_cpu and 2d_cpu in nnUNetPlansCPU); a conflicting one is replaced only with `force`.
    """
    folder = Path(preprocessed_dataset_folder)
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; run nnUNetv2_plan_and_preprocess for this dataset first")
    preset = load_preset(preset_name)
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
                                    run: Callable[[list[str]], object], processes: int = 2) -> Path:
    """nnU-Net plans and preprocesses a raw dataset for the configuration the preset inherits from (checking the
    dataset first), then the preset's plans are written beside nnU-Net's; returns their file. `run` executes the
    command as the caller logs it (and must raise when it fails)."""
    configuration = load_preset(preset_name)["inherits_from"]
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", str(processes),
         "-npfp", str(processes), "--verify_dataset_integrity"])
    folders = sorted(Path(preprocessed_root).glob(f"Dataset{dataset_id:03d}_*"))
    if len(folders) != 1:
        raise FileNotFoundError(f"expected one preprocessed folder Dataset{dataset_id:03d}_* in {preprocessed_root} "
                                f"after nnUNetv2_plan_and_preprocess, found {len(folders)}")
    return write_preset_plans(folders[0], preset_name)


def main(argv: list[str]) -> int:
    """`nnunet-diffusion plans`."""
    parser = argparse.ArgumentParser(prog="nnunet-diffusion plans", description="write a CPU-sized inheriting "
                                     "configuration from a plans preset")
    parser.add_argument("dataset", help="dataset id or name, e.g. 990 or Dataset990_DiffusionDemo")
    parser.add_argument("--preset", default="cpu_tiny", choices=available_presets())
    parser.add_argument("--source-plans", default="nnUNetPlans", help="plans identifier to derive from")
    parser.add_argument("--plans-name", help="identifier of the written plans (default: the source's + the "
                        "preset's suffix, e.g. nnUNetPlansCPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing plans file that conflicts")
    args = parser.parse_args(argv)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed:
        raise SystemExit("nnUNet_preprocessed is not set; export it as for nnUNetv2_train")
    folder = f"{nnUNet_preprocessed}/{maybe_convert_to_dataset_name(args.dataset)}"
    with plugin_command("plans", FileExistsError, FileNotFoundError, ValueError):
        print(write_preset_plans(folder, args.preset, args.source_plans, args.plans_name, args.force))
    return 0
