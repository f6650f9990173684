"""`nnunet-diffusion doctor`: checks that nnU-Net will find the plugin's trainers and says how to fix what is off.

nnU-Net's own error for a trainer it cannot find ("Could not find requested nnunet trainer ...") cannot mention
the plugin's setup line; this command runs the same lookup and adds the fix.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
from importlib import metadata
from pathlib import Path

from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, shim_folder

SETUP_LINE = 'eval "$(nnunet-diffusion env)"'
DEFAULT_TRAINER = "nnUNetTrainerDiffRecycle"


def ext_trainer_problems() -> list[str]:
    """What is wrong with nnUNet_extTrainer, judged from the variable alone (no lookup)."""
    value = os.environ.get(EXT_TRAINER_VARIABLE, "")
    if not value:
        return [f"{EXT_TRAINER_VARIABLE} is not set, so nnU-Net cannot find the plugin's trainers. Fix: {SETUP_LINE}"]
    folders = [p for p in value.split(os.pathsep) if p.strip()]
    problems = [f"{EXT_TRAINER_VARIABLE} lists {p}, which is not a folder" for p in folders if not Path(p).is_dir()]
    if not any(Path(p).resolve() == shim_folder() for p in folders):
        problems.append(f"{EXT_TRAINER_VARIABLE}={value} does not list the plugin's shim folder {shim_folder()}. "
                        f"Fix: {SETUP_LINE}")
    return problems


def lookup_problems(trainer_name: str) -> list[str]:
    """Run nnU-Net's own trainer lookup (as nnUNetv2_train and nnUNetv2_predict do) and report its failure."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunet_diffusion.trainers import __all__ as plugin_trainers
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the lookup prints every module it inspects
            trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError as error:
        close = [name for name in difflib.get_close_matches(trainer_name, plugin_trainers, n=1) if name != trainer_name]
        fix = f"Did you mean {close[0]}?" if close else f"Fix: {SETUP_LINE}"
        return [f"nnU-Net cannot find {trainer_name}. {fix} nnU-Net says: {error}"]
    if trainer_name in plugin_trainers and not trainer_class.__module__.startswith("nnunet_diffusion."):
        return [f"nnU-Net resolves {trainer_name} to {trainer_class.__module__}, not to the plugin: another folder "
                f"in {EXT_TRAINER_VARIABLE} defines the same name. Fix: remove it or rename that class"]
    return []


def nnunet_version_problems() -> list[str]:
    """The installed nnunetv2 against the range the plugin was installed with (setup.py's install_requires)."""
    from packaging.requirements import Requirement
    requirement = next(r for r in map(Requirement, metadata.requires("nnunet-diffusion") or []) if r.name == "nnunetv2")
    installed = metadata.version("nnunetv2")
    if installed not in requirement.specifier:
        return [f"nnunetv2 {installed} is installed; the plugin needs {requirement}. Fix: pip install '{requirement}'"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion doctor",
                                     description="check that nnU-Net finds the plugin's trainers; exit 1 on problems")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER, help="trainer name to look up as nnU-Net would")
    args = parser.parse_args(argv)
    problems = nnunet_version_problems() + ext_trainer_problems() + lookup_problems(args.trainer)
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print(f"ok: nnU-Net finds {args.trainer} through {EXT_TRAINER_VARIABLE}={os.environ[EXT_TRAINER_VARIABLE]}")
    return 1 if problems else 0
