"""Pretraining networks and the probe networks that reuse them through nnU-Net's `-pretrained_weights`.

Both are built on `PretrainedBackbone`: nnU-Net's planned UNet (optionally time-conditioned with FiLM, as the
diffusion segmentation networks are) plus, for BPR guidance, a frozen embedded BPR whose coordinate map is
concatenated to the UNet input. A probe network is the same backbone (identical state-dict keys) plus a head
under `head.seg_layers.*`, so `load_pretrained_weights` copies every backbone tensor and leaves only the head
random. The UNet's own `decoder.seg_layers` (the pretext output layer) is skipped by it too and unused by probes.

Two persistent buffers make checkpoints self-describing: `holds_pretrained_weights` is True in a pretraining
network and False in a freshly built probe, so a probe knows whether `-pretrained_weights` filled its backbone;
`num_timesteps` (time-conditioned backbones) carries the pretraining T, which fixes how timestep 0 is embedded.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_diffusion.core.network import (TimeContext, TimeEmbedding, add_time_conditioning, build_unet_from_plans,
                                           conditioned_on)
from nnunet_diffusion.pretraining.bpr_guidance import BPR_MAP_CHANNELS, EmbeddedBPR
from nnunet_diffusion.pretraining.heads import LinearProbeHead, NonLinearProbeHead

EMBEDDING_DIM = 128
PROBE_TIMESTEP = 0  # probes see the clean image at the smallest pretraining timestep


@dataclass(frozen=True)
class BackboneSpec:
    """What a pretrained backbone consumes, which trainer pretrains it and which probe trainers fit it."""
    time_conditioning: bool
    bpr_guidance: bool
    pretraining_trainer: str
    trainer_suffix: str

    @property
    def probe_trainers(self) -> tuple[str, ...]:
        return tuple(f"nnUNetTrainer{kind}{self.trainer_suffix}" for kind in ("ProbeNonLinear", "ProbeLinear",
                                                                             "Finetune"))


DIFFUSION = BackboneSpec(True, False, pretraining_trainer="nnUNetTrainerDiffPretrain", trainer_suffix="")
DIFFUSION_BPR = BackboneSpec(True, True, pretraining_trainer="nnUNetTrainerDiffPretrainBPR", trainer_suffix="BPR")
RESTORATIVE = BackboneSpec(False, False, pretraining_trainer="nnUNetTrainerRestorePretrain",
                           trainer_suffix="Restore")


class PretrainingCheckpointNotASegmenter(RuntimeError):
    """Raised when a pretraining network is used like a segmentation model (e.g. by nnUNetv2_predict)."""


class PretrainedBackbone(nn.Module):
    """What pretraining and probe networks share, built identically so that their state-dict keys match."""

    def __init__(self, unet: nn.Module, spec: BackboneSpec, bpr: EmbeddedBPR | None):
        super().__init__()
        self.spec = spec
        self.bpr = bpr
        self.context = TimeContext()
        self.time_embedding: TimeEmbedding | None = None
        if spec.time_conditioning:
            add_time_conditioning(unet, EMBEDDING_DIM, self.context)
            self.time_embedding = TimeEmbedding(EMBEDDING_DIM)
            self.register_buffer("num_timesteps", torch.tensor(0))
        self.unet = unet
        self.register_buffer("holds_pretrained_weights", torch.tensor(False))

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.unet.decoder.deep_supervision = enabled

    def backbone_forward(self, unet_input: torch.Tensor, image: torch.Tensor, t: torch.Tensor | None
                         ) -> torch.Tensor:
        """UNet output for `unet_input` (noisy, distorted or clean image), with the BPR map of the clean `image`
        appended when BPR-guided and FiLM conditioned on timesteps `t` (one per sample) when time-conditioned."""
        if self.bpr is not None:
            unet_input = torch.cat([unet_input, self.bpr(image).to(unet_input.dtype)], dim=1)
        if self.time_embedding is None:
            return self.unet(unet_input)
        if t is None:
            raise ValueError("a time-conditioned backbone needs timesteps t (one per sample)")
        embedding = self.time_embedding.of_timesteps(t.to(unet_input.device), self.num_timesteps.float())
        with conditioned_on(self.context, embedding):
            return self.unet(unet_input)


class PretrainingNetwork(PretrainedBackbone):
    """The pretext network: `forward(image, corrupted, t)` predicts the pretext target (ε or the clean patch).

    Called like a segmentation network, `forward(image)`, it raises: a pretraining checkpoint has no
    segmentation output, it is the input of a probe or fine-tuning trainer.
    """

    def __init__(self, unet: nn.Module, spec: BackboneSpec, bpr: EmbeddedBPR | None, num_timesteps: int | None):
        super().__init__(unet, spec, bpr)
        # Without deep supervision only the last output layer is used; frozen, the others cannot stall DDP.
        unet.decoder.seg_layers[:-1].requires_grad_(False)
        self.holds_pretrained_weights.fill_(True)
        if spec.time_conditioning:
            self.num_timesteps.fill_(num_timesteps)

    def forward(self, image: torch.Tensor, corrupted: torch.Tensor | None = None, t: torch.Tensor | None = None
                ) -> torch.Tensor:
        if corrupted is None:
            raise PretrainingCheckpointNotASegmenter(
                "this is a pretraining checkpoint, not a segmentation model, so nnUNetv2_predict cannot use it. "
                f"Train a probe on it first: nnUNetv2_train DATASET CONFIGURATION FOLD -tr "
                f"{' | '.join(self.spec.probe_trainers)} -pretrained_weights <this checkpoint_final.pth>, "
                f"then predict with that probe trainer")
        return self.backbone_forward(corrupted, image, t)


class ProbeNetwork(PretrainedBackbone):
    """Backbone + head: `forward(image)` → logits (B, classes, *spatial), as nnU-Net's predictor expects.

    Features are the outputs of every decoder stage (captured with forward hooks) for the clean image at
    timestep PROBE_TIMESTEP. With `freeze_backbone` the backbone never gets gradients and stays in eval mode
    even when nnU-Net calls `network.train()`; the BPR is always frozen.
    """

    def __init__(self, unet: nn.Module, spec: BackboneSpec, bpr: EmbeddedBPR | None, head: nn.Module,
                 freeze_backbone: bool):
        super().__init__(unet, spec, bpr)
        self.head = head
        self.freeze_backbone = freeze_backbone
        unet.decoder.seg_layers.requires_grad_(False)  # the pretext output layer: not used by probes
        if freeze_backbone:
            for module in self.backbone_modules():
                module.requires_grad_(False)
        self.train()

    def backbone_modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.time_embedding) if m is not None]

    def train(self, mode: bool = True) -> ProbeNetwork:
        super().train(mode)
        if self.freeze_backbone:
            for module in self.backbone_modules():
                module.train(False)
        return self

    def decoder_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the UNet's decoder stages, coarsest first."""
        captured: list[torch.Tensor] = []
        hooks = [stage.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
                 for stage in self.unet.decoder.stages]
        t = torch.full((image.shape[0],), PROBE_TIMESTEP, device=image.device, dtype=torch.long)
        try:
            self.backbone_forward(image, image, t if self.time_embedding is not None else None)
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.freeze_backbone else nullcontext():
            features = self.decoder_features(image)
        return self.head(features, image.shape[2:])


def decoder_level_channels(unet: nn.Module) -> list[int]:
    """Channels of the decoder stage outputs, coarsest first (each stage outputs its skip's width)."""
    encoder_channels = unet.encoder.output_channels
    return [encoder_channels[-(stage + 2)] for stage in range(len(unet.decoder.stages))]


def _build_parts(spec: BackboneSpec, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                 num_image_channels: int) -> tuple[nn.Module, EmbeddedBPR | None]:
    """The planned UNet (pretext output: one channel per image channel) and, when BPR-guided, the BPR."""
    patch_size = list(configuration_manager.patch_size)
    bpr = None
    if spec.bpr_guidance:
        if len(patch_size) != 3:
            raise ValueError(f"BPR guidance needs a 3D configuration; this one has patch size {patch_size}")
        if num_image_channels != 1:
            raise ValueError(f"the BPR reads a single image channel, but this dataset has {num_image_channels} "
                             f"input channels; use a pretraining or probe trainer without BPR")
        bpr = EmbeddedBPR(patch_size)
        if min(patch_size) < bpr.min_size:
            raise ValueError(f"image patches too small for the BPR: patch size {patch_size}, the BPR needs at least "
                             f"{bpr.min_size} voxels per axis; use a configuration with a larger patch size")
    unet_inputs = num_image_channels + (BPR_MAP_CHANNELS if bpr is not None else 0)
    unet = build_unet_from_plans(plans_manager, configuration_manager, unet_inputs, num_image_channels,
                                 deep_supervision=False)
    return unet, bpr


def build_pretraining_network(spec: BackboneSpec, plans_manager: PlansManager,
                              configuration_manager: ConfigurationManager, num_image_channels: int,
                              num_timesteps: int | None) -> PretrainingNetwork:
    unet, bpr = _build_parts(spec, plans_manager, configuration_manager, num_image_channels)
    return PretrainingNetwork(unet, spec, bpr, num_timesteps)


def build_probe_network(spec: BackboneSpec, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                        num_image_channels: int, num_classes: int, head_kind: str, freeze_backbone: bool
                        ) -> ProbeNetwork:
    """A probe whose backbone keys and shapes equal those of `build_pretraining_network(spec, ...)`."""
    unet, bpr = _build_parts(spec, plans_manager, configuration_manager, num_image_channels)
    heads = {"linear": LinearProbeHead, "nonlinear": NonLinearProbeHead}
    if head_kind not in heads:
        raise ValueError(f"unknown probe head {head_kind!r}; choose one of {', '.join(heads)}")
    head = heads[head_kind](decoder_level_channels(unet), num_classes, len(configuration_manager.patch_size))
    return ProbeNetwork(unet, spec, bpr, head, freeze_backbone)
