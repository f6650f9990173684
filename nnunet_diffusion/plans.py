"""Derive small inheriting configurations from a dataset's nnU-Net plans, using the presets in `plans/`.

An inheriting configuration reuses the parent's preprocessed data (same `data_identifier`), so a CPU-sized
variant costs no re-preprocessing; only patch size, batch size and feature widths change.
"""
from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("nnunet_diffusion_presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    presets = available_presets()
    if name not in presets:
        raise ValueError(f"unknown plans preset {name!r}; available: {', '.join(presets)}")
    return json.loads(resources.files("nnunet_diffusion_presets").joinpath(f"{name}.json").read_text())


def derive_plans(plans: dict, preset: dict) -> dict:
    """A copy of `plans` named `preset['plans_name']` with one extra configuration built from the preset."""
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
    derived["plans_name"] = preset["plans_name"]
    derived["configurations"][preset["configuration"]] = {
        "inherits_from": parent_name, "patch_size": patch, "batch_size": preset["batch_size"],
        "architecture": architecture}
    return derived


def write_preset_plans(preprocessed_dataset_folder: str | Path, preset_name: str,
                       source_plans: str = "nnUNetPlans") -> Path:
    """Write `<plans_name>.json` next to `<source_plans>.json` in a preprocessed dataset folder."""
    folder = Path(preprocessed_dataset_folder)
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; run nnUNetv2_plan_and_preprocess for this dataset first")
    preset = load_preset(preset_name)
    target = folder / f"{preset['plans_name']}.json"
    target.write_text(json.dumps(derive_plans(json.loads(source.read_text()), preset), indent=2))
    return target
