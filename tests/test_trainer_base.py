"""What every plugin trainer shares through `PluginTrainer`: nnU-Net's signatures, the cascade refusal, the
precision context and the validation gathering."""
from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunet_diffusion.trainers import ALL_TRAINERS
from nnunet_diffusion.trainers.base import PluginTrainer
from nnunet_runs import CONFIGURATION, PLANS


@pytest.mark.parametrize("trainer_class", ALL_TRAINERS, ids=lambda c: c.__name__)
def test_every_trainer_derives_from_the_base_with_nnunets_exact_signatures(trainer_class):
    """nnU-Net rebuilds trainers from their __init__ signature, so no trainer may add a parameter."""
    def signature(function):
        return inspect.signature(function, eval_str=True)
    assert issubclass(trainer_class, PluginTrainer)
    assert signature(trainer_class.__init__) == signature(nnUNetTrainer.__init__)
    assert signature(trainer_class.build_network_architecture) == signature(nnUNetTrainer.build_network_architecture)


class _Stub:
    """Just the attributes the base's helpers read."""

    def __init__(self, device: str):
        self.device, self.is_ddp = torch.device(device), False


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_precision_is_autocast_on_cuda_only_and_validation_values_stay_local_without_ddp():
    assert isinstance(PluginTrainer.precision(_Stub("cpu")), dummy_context)
    assert isinstance(PluginTrainer.precision(_Stub("cuda")), torch.autocast)
    values = np.array([0.25, 0.5])
    assert PluginTrainer.gather_from_ranks(_Stub("cpu"), values) is values


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerDiffRecycle", "nnUNetTrainerBPR",
                                          "nnUNetTrainerDiffPretrain", "nnUNetTrainerProbeNonLinear"])
def test_every_family_refuses_a_cascaded_configuration_with_the_fix(demo_dataset, trainer_name):
    folder = os.path.join(os.environ["nnUNet_preprocessed"], demo_dataset.name)
    with open(os.path.join(folder, f"{PLANS}.json")) as f:
        plans = json.load(f)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans["configurations"]["3d_cascade"] = {"inherits_from": CONFIGURATION, "previous_stage": CONFIGURATION}
    plans["continue_training"] = False  # nnU-Net 2.8 pops it from the plans (run_training sets it)
    trainer_class = next(c for c in ALL_TRAINERS if c.__name__ == trainer_name)
    with pytest.raises(ValueError, match=f"{trainer_name} does not support cascaded configurations.*full-resolution"):
        trainer_class(plans, "3d_cascade", 0, dataset_json, torch.device("cpu"))


def test_the_shim_folder_only_re_exports_and_is_installed_under_its_own_name():
    """nnU-Net imports the shim modules as top-level names and drops them again: a class defined there would be a
    throw-away copy, so the folder may only re-export the package's trainers."""
    import ast

    import nnunet_diffusion_ext

    from nnunet_diffusion.environment import shim_folder
    folder = shim_folder()
    assert folder.name == nnunet_diffusion_ext.__name__
    modules = sorted(folder.glob("*.py"))
    assert modules
    for module in modules:
        tree = ast.parse(module.read_text())
        assert not [node for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef))], module
