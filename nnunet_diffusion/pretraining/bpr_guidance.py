"""The frozen Body Part Regressor (BPR) that guides BPR-conditioned pretraining, embedded in the network.

Where the BPR comes from: the environment variable `nnUNet_diffusion_bpr` names the `checkpoint_final.pth` of
an `nnUNetTrainerBPR` training with the same plans and configuration as the pretraining, e.g.
`nnUNetv2_train D 3d_fullres all -p nnUNetPlans -tr nnUNetTrainerBPR` (checked against what the BPR stored: plans
identifier, preprocessed-data identifier, patch size and spacing). The BPR must have nnUNetTrainerBPR's default
architecture. The pretraining trainer copies the BPR's weights into its own network once, at the start of
training; from then on they are part of every checkpoint, so probes, continued trainings and the predictor
never need the variable.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from nnunet_diffusion.bpr.model import BPRConfig, BPRModel, load_bpr_from_nnunet_checkpoint

BPR_CHECKPOINT_VARIABLE = "nnUNet_diffusion_bpr"
BPR_MAP_CHANNELS = 3  # one coordinate per array axis


class _BPRWithoutExtraState(BPRModel):
    """A BPRModel whose state dict holds tensors only. BPRModel stores its config as extra state (a dict), but
    nnU-Net's load_pretrained_weights reads `.shape` of every state-dict entry; EmbeddedBPR keeps the config
    values that matter for the forward pass in buffers instead."""
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class EmbeddedBPR(nn.Module):
    """A BPR that is part of a network's state dict: frozen, always in eval mode, never noised or trained.

    Networks are built before any checkpoint is read (by the trainer, the probe trainers and the predictor), so
    the architecture is BPRConfig's default one. The settings that change the forward pass but not the weights
    (intensity normalisation, CT window) are buffers and travel with the weights; `loaded` records that real
    BPR weights were copied in (False in a freshly built network).
    """

    def __init__(self, patch_size: Sequence[int]):
        super().__init__()
        config = BPRConfig(patch_size=tuple(int(s) for s in patch_size))
        self.model = _BPRWithoutExtraState(config).requires_grad_(False)
        self.register_buffer("uses_ct_window", torch.tensor(config.intensity_normalization == "ct_window"))
        self.register_buffer("ct_window", torch.tensor(config.ct_window, dtype=torch.float32))
        self.register_buffer("loaded", torch.tensor(False))
        self.train(False)

    @property
    def min_size(self) -> int:
        return self.model.config.min_size

    def train(self, mode: bool = True) -> EmbeddedBPR:
        """Always eval: the BPR is a fixed coordinate function, whatever mode the surrounding network is in."""
        return super().train(False)

    def load_from(self, bpr: BPRModel) -> None:
        """Copy a trained BPR's weights and intensity settings in; its architecture must be the default one."""
        if bpr.config.architecture() != self.model.config.architecture():
            raise ValueError(f"the BPR has features_per_stage/head_hidden {bpr.config.architecture()}, but the "
                             f"pretraining networks embed BPRConfig's default {self.model.config.architecture()}; "
                             f"use a BPR trained with nnUNetTrainerBPR's default architecture")
        self.model.load_state_dict({**dict(bpr.named_parameters()), **dict(bpr.named_buffers())})
        self.uses_ct_window.fill_(bpr.config.intensity_normalization == "ct_window")
        self.ct_window.copy_(torch.tensor(bpr.config.ct_window, dtype=torch.float32))
        self.loaded.fill_(True)
        self._update_config()

    def _update_config(self) -> None:
        self.model.config = dataclasses.replace(
            self.model.config, intensity_normalization="ct_window" if bool(self.uses_ct_window) else "none",
            ct_window=tuple(self.ct_window.tolist()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._update_config()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, Z, Y, X) image → (B, 3, Z, Y, X) coordinate map, without gradients, in the image's dtype."""
        with torch.no_grad():
            return self.model.coordinate_map(image.float()).to(image.dtype)


def bpr_plans_mismatches(config: BPRConfig, plans_identifier: str, data_identifier: str,
                         patch_size: Sequence[int], spacing: Sequence[float]) -> list[str]:
    """What differs between the data a BPR was trained on and the data it is asked to guide."""
    problems = []
    if config.plans_identifier is not None and config.plans_identifier != plans_identifier:
        problems.append(f"plans {config.plans_identifier!r} (here {plans_identifier!r})")
    if config.data_identifier is not None and config.data_identifier != data_identifier:
        problems.append(f"preprocessed data {config.data_identifier!r} (here {data_identifier!r})")
    if tuple(config.patch_size) != tuple(int(s) for s in patch_size):
        problems.append(f"patch size {list(config.patch_size)} (here {list(patch_size)})")
    if config.spacing is not None and any(abs(a - float(b)) > 1e-6 for a, b in zip(config.spacing, spacing)):
        problems.append(f"spacing {list(config.spacing)} (here {list(spacing)})")
    return problems


def load_guidance_bpr(plans_identifier: str, configuration: str, data_identifier: str, patch_size: Sequence[int],
                      spacing: Sequence[float], environment: Mapping[str, str] = os.environ) -> BPRModel:
    """The BPR named by `nnUNet_diffusion_bpr`, checked against the plans and configuration being trained."""
    train_hint = (f"train one with `nnUNetv2_train DATASET {configuration} all -p {plans_identifier} "
                  f"-tr nnUNetTrainerBPR` and set {BPR_CHECKPOINT_VARIABLE}=<its fold folder>/checkpoint_final.pth")
    location = environment.get(BPR_CHECKPOINT_VARIABLE, "")
    if not location:
        raise RuntimeError(f"BPR-guided pretraining needs a trained Body Part Regressor, but the environment "
                           f"variable {BPR_CHECKPOINT_VARIABLE} is not set; {train_hint}")
    path = Path(location)
    if not path.is_file():
        raise FileNotFoundError(f"{BPR_CHECKPOINT_VARIABLE}={location} does not exist or is not a file; point it "
                                f"at the checkpoint_final.pth of an nnUNetTrainerBPR training ({train_hint})")
    bpr = load_bpr_from_nnunet_checkpoint(path)
    problems = bpr_plans_mismatches(bpr.config, plans_identifier, data_identifier, patch_size, spacing)
    if problems:
        raise ValueError(f"the BPR in {path} was trained on other data: {'; '.join(problems)}. Its coordinates "
                         f"would not match what this training sees; {train_hint}")
    return bpr
