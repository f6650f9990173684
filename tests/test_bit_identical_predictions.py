"""Predictions of a fixed-seed diffusion network, pinned bit for bit.

Why: refactors of the network code (moving the time conditioning, the CPU layout workarounds, the sampling loop or
the plans builder to other modules) must not change a single prediction or training output. This test rebuilds
small networks the way nnU-Net's predictor does (the trainer's static `build_network_architecture` from a
plans-like configuration, `torch.manual_seed` before it), runs the sampler as the predictor would (`network(tile)`
in eval mode, DDIM and DDPM, settings from the `nnUNet_diffusion_*` variables or a `SamplerSettings`, seeded noise,
early exit) plus training-mode denoising passes with their gradients, and compares every output with
`tests/data/fixed_seed_predictions.pt` using `torch.equal`.

The reference was written by this module run against the unchanged code (a worktree of the commit before the
refactor), on CPU with one torch thread:

    PYTHONPATH=/path/to/unchanged/checkout python tests/test_bit_identical_predictions.py

Regenerate it only for a deliberate change of results, and say so in the commit. Float results can differ between
CPU instruction sets; if the test fails on another machine for the unchanged code too, regenerate there from the
unchanged commit before judging a refactor.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_diffusion.core.sampling import ENV_EARLY_EXIT, ENV_SAMPLER, ENV_SEED, ENV_STEPS, SamplerSettings
from nnunet_diffusion.trainers.segmentation import (nnUNetTrainerDiffRecycle, nnUNetTrainerDiffRecycleNoTime,
                                                    nnUNetTrainerDiffSelfCond)
from nnunet_diffusion.utils import environment

REFERENCE = Path(__file__).parent / "data" / "fixed_seed_predictions.pt"
CLASSES = 3


def _configuration(dim: int) -> ConfigurationManager:
    """A plans configuration as nnU-Net writes it: a 3-stage PlainConvUNet with 4..8 features (the CPU presets'
    input-convolution layout hooks apply in 3D)."""
    conv, norm = ("torch.nn.modules.conv.Conv3d", "torch.nn.modules.instancenorm.InstanceNorm3d") if dim == 3 else \
        ("torch.nn.modules.conv.Conv2d", "torch.nn.modules.instancenorm.InstanceNorm2d")
    return ConfigurationManager({"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": conv,
                        "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim, [2] * dim, [2] * dim],
                        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                        "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}})


def _network(trainer: type, dim: int = 3, deep_supervision: bool = False) -> torch.nn.Module:
    """The predictor's network of a fixed seed, with FiLM projections away from their zero start (as after
    training), so that the timestep changes the output."""
    torch.manual_seed(0)
    network = trainer.build_network_architecture(None, _configuration(dim), 1, CLASSES, deep_supervision)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "to_scale_shift" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return network


def _tensor(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _predict_tile(network: torch.nn.Module, tile: torch.Tensor, **variables: str | None) -> torch.Tensor:
    """What nnU-Net's predictor does per tile: one `network(tile)` in eval mode, settings from the environment."""
    unset = {name: None for name in (ENV_SAMPLER, ENV_STEPS, ENV_SEED, ENV_EARLY_EXIT)}
    with environment(**{**unset, **variables}), torch.inference_mode():
        output = network.eval()(tile)
    return output


def _training_pass(network: torch.nn.Module, image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   self_condition: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A training-mode denoising pass: its (deep-supervision) outputs and every parameter's gradient norm."""
    network.train().zero_grad()
    output = network(image, x_t, t, self_condition)
    outputs = output if isinstance(output, (list, tuple)) else [output]
    sum(o.square().sum() for o in outputs).backward()
    norms = torch.stack([p.grad.norm() if p.grad is not None else torch.tensor(-1.0)
                         for _, p in network.named_parameters()])
    return {**{f"output{i}": o.detach() for i, o in enumerate(outputs)}, "gradient_norms": norms}


def reference_outputs() -> dict[str, object]:
    """Every pinned output, computed with the code on the import path (one torch thread, CPU)."""
    tile, batch = _tensor(1, 1, 8, 8, 8, seed=2), _tensor(2, 1, 8, 8, 8, seed=3)
    results: dict[str, object] = {}

    recycle = _network(nnUNetTrainerDiffRecycle)
    results["state_dict_keys"] = list(recycle.state_dict().keys())
    results["ddim_all_steps_env"] = _predict_tile(recycle, tile, **{ENV_SEED: "3"})
    results["ddpm_3_steps_env"] = _predict_tile(recycle, tile, **{ENV_SAMPLER: "ddpm", ENV_STEPS: "3", ENV_SEED: "4"})
    results["ddim_2_steps_early_exit_env"] = _predict_tile(
        recycle, tile, **{ENV_STEPS: "4", ENV_SEED: "5", ENV_EARLY_EXIT: "1.0"})
    with torch.inference_mode():
        with recycle.sampling_with(SamplerSettings("ddpm", 2, seed=6)):
            results["ddpm_sampling_with"] = recycle(tile)
        results["ddim_3_steps_every_step"] = torch.stack(
            list(recycle.sample_steps(tile, SamplerSettings("ddim", 3, seed=7))))
        results["no_grad_denoise_tile"] = recycle.denoise(tile, _tensor(1, CLASSES, 8, 8, 8, seed=8),
                                                          torch.tensor([2]))
    for key, value in _training_pass(recycle, batch, _tensor(2, CLASSES, 8, 8, 8, seed=9),
                                     torch.tensor([0, 4])).items():
        results[f"recycle_train_{key}"] = value

    recycle_ds = _network(nnUNetTrainerDiffRecycle, deep_supervision=True)
    results["deep_supervision_validation_ddim"] = _predict_tile(recycle_ds, batch, **{ENV_STEPS: "2",
                                                                                       ENV_SEED: "10"})[0]
    for key, value in _training_pass(recycle_ds, batch, _tensor(2, CLASSES, 8, 8, 8, seed=11),
                                     torch.tensor([1, 3])).items():
        results[f"deep_supervision_train_{key}"] = value

    self_cond = _network(nnUNetTrainerDiffSelfCond)
    self_cond.set_mask_activation("sigmoid")
    results["self_conditioning_sigmoid_ddpm_env"] = _predict_tile(
        self_cond, tile, **{ENV_SAMPLER: "ddpm", ENV_STEPS: "3", ENV_SEED: "12"})
    for key, value in _training_pass(self_cond, tile, _tensor(1, CLASSES, 8, 8, 8, seed=13), torch.tensor([4]),
                                     _tensor(1, CLASSES, 8, 8, 8, seed=14)).items():
        results[f"self_conditioning_train_{key}"] = value

    no_time = _network(nnUNetTrainerDiffRecycleNoTime)
    results["no_time_conditioning_ddim_env"] = _predict_tile(no_time, tile, **{ENV_STEPS: "3", ENV_SEED: "15"})

    recycle_2d = _network(nnUNetTrainerDiffRecycle, dim=2)
    results["2d_ddpm_env"] = _predict_tile(recycle_2d, _tensor(1, 1, 16, 16, seed=16),
                                           **{ENV_SAMPLER: "ddpm", ENV_SEED: "17"})
    return results


@pytest.fixture(scope="module")
def outputs(one_torch_thread) -> dict[str, object]:
    return reference_outputs()


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    return torch.load(REFERENCE, weights_only=True)


def test_the_same_outputs_are_pinned(outputs, reference):
    assert sorted(outputs) == sorted(reference)


@pytest.mark.parametrize("name", sorted(torch.load(REFERENCE, weights_only=True)) if REFERENCE.exists() else [])
def test_fixed_seed_outputs_are_bit_identical_to_the_reference(outputs, reference, name):
    if isinstance(reference[name], torch.Tensor):
        assert outputs[name].dtype == reference[name].dtype and torch.equal(outputs[name], reference[name])
    else:
        assert outputs[name] == reference[name]


if __name__ == "__main__":
    torch.set_num_threads(1)
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save(reference_outputs(), REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)")
