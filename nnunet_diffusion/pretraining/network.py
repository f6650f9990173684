"""Pretraining networks and the probe and fine-tuning networks that reuse them through `-pretrained_weights`.

All are built on `PretrainedBackbone`: nnU-Net's planned UNet (optionally time-conditioned with FiLM, as the
diffusion segmentation networks are) and, for coordinate-guided backbones, the dataset's last three channels
(anatomical coordinates from `nnunet-diffusion add-coordinates`) as extra UNet inputs and as a per-voxel
modulation after every normalisation layer (`coordinate_modulation.py`); only the image channels are noised or
distorted. A probe network is the same backbone (identical state-dict keys) plus a head
under `head.seg_layers.*`, so `load_pretrained_weights` copies every backbone tensor and leaves only the head
random. The UNet's own `decoder.seg_layers` (the pretext output layer) is skipped by it too and unused by probes.
A fine-tuning network is the same backbone whose `decoder.seg_layers` output the classes instead (with nnU-Net's
deep supervision), so `load_pretrained_weights` copies the whole pretrained network except the pretext output layer.

Two persistent buffers make checkpoints self-describing: `holds_pretrained_weights` is True in a pretraining
network and False in a freshly built probe or fine-tuning network, so a trainer knows whether
`-pretrained_weights` filled it; `num_timesteps` (time-conditioned backbones) carries the pretraining T, which
fixes how timestep 0 is embedded.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_diffusion.core.time_conditioning import TimeContext, TimeEmbedding, add_time_conditioning, conditioned_on
from nnunet_diffusion.core.unet_from_plans import build_unet_from_plans
from nnunet_diffusion.pretraining.coordinate_modulation import (COORDINATE_CHANNELS, COORDINATE_INIT_STD,
                                                                CoordinateContext, add_coordinate_modulation,
                                                                conditioned_on_coordinates)
from nnunet_diffusion.pretraining.heads import LinearProbeHead, NonLinearProbeHead

EMBEDDING_DIM = 128
CLEAN_IMAGE_TIMESTEP = 0  # probes and fine-tuning see the clean image at the smallest pretraining timestep


@dataclass(frozen=True)
class BackboneSpec:
    """What a pretrained backbone consumes, which trainer pretrains it and which probe trainers fit it."""
    time_conditioning: bool
    coordinates: bool  # reads the dataset's last three channels as anatomical coordinates
    pretraining_trainer: str
    trainer_suffix: str

    @property
    def probe_trainers(self) -> tuple[str, ...]:
        """The trainers that take a checkpoint of this pretraining as `-pretrained_weights`."""
        return tuple(f"nnUNetTrainer{kind}{self.trainer_suffix}" for kind in ("ProbeNonLinear", "ProbeLinear",
                                                                             "PretrainedFinetune"))

    def image_channels(self, num_input_channels: int) -> int:
        """The channels that are image (noised, distorted, reconstructed): all but the coordinates."""
        channels = num_input_channels - (COORDINATE_CHANNELS if self.coordinates else 0)
        if channels < 1:
            raise ValueError(f"a coordinate-guided backbone needs image channels besides the {COORDINATE_CHANNELS} "
                             f"coordinate channels, got {num_input_channels} input channels")
        return channels


DIFFUSION = BackboneSpec(True, False, pretraining_trainer="nnUNetTrainerDiffPretrain", trainer_suffix="")
DIFFUSION_COORD = BackboneSpec(True, True, pretraining_trainer="nnUNetTrainerDiffPretrainCoord",
                               trainer_suffix="Coord")
RESTORATIVE = BackboneSpec(False, False, pretraining_trainer="nnUNetTrainerRestorePretrain",
                           trainer_suffix="Restore")
RESTORATIVE_COORD = BackboneSpec(False, True, pretraining_trainer="nnUNetTrainerRestorePretrainCoord",
                                 trainer_suffix="RestoreCoord")
BACKBONES = (DIFFUSION, DIFFUSION_COORD, RESTORATIVE, RESTORATIVE_COORD)


class PretrainingCheckpointNotASegmenter(RuntimeError):
    """Raised when a pretraining network is used like a segmentation model (e.g. by nnUNetv2_predict)."""


class PretrainedBackbone(nn.Module):
    """What pretraining and probe networks share, built identically so that their state-dict keys match."""

    def __init__(self, unet: nn.Module, spec: BackboneSpec, num_image_channels: int):
        super().__init__()
        self.spec = spec
        self.num_image_channels = num_image_channels
        self.context = TimeContext()
        self.time_embedding: TimeEmbedding | None = None
        if spec.time_conditioning:
            add_time_conditioning(unet, EMBEDDING_DIM, self.context)
            self.time_embedding = TimeEmbedding(EMBEDDING_DIM)
            self.register_buffer("num_timesteps", torch.tensor(0))
        self.coordinate_context = CoordinateContext()
        if spec.coordinates:
            add_coordinate_modulation(unet, self.coordinate_context, COORDINATE_INIT_STD)
        self.unet = unet
        self.register_buffer("holds_pretrained_weights", torch.tensor(False))

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.unet.decoder.deep_supervision = enabled

    def coordinates_of(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The coordinate channels of nnU-Net's input (image channels first), or None without coordinates."""
        return inputs[:, self.num_image_channels:] if self.spec.coordinates else None

    def backbone_forward(self, unet_input: torch.Tensor, inputs: torch.Tensor, t: torch.Tensor | None
                         ) -> torch.Tensor:
        """UNet output for `unet_input` (the noisy, distorted or clean image channels): with the coordinate
        channels of nnU-Net's `inputs` appended and modulating every normalisation when coordinate-guided, and FiLM
        conditioned on timesteps `t` (one per sample) when time-conditioned."""
        coordinates = self.coordinates_of(inputs)
        with ExitStack() as stack:
            if coordinates is not None:
                coordinates = coordinates.to(unet_input.dtype)
                unet_input = torch.cat([unet_input, coordinates], dim=1)
                stack.enter_context(conditioned_on_coordinates(self.coordinate_context, coordinates))
            if self.time_embedding is not None:
                if t is None:
                    raise ValueError("a time-conditioned backbone needs timesteps t (one per sample)")
                embedding = self.time_embedding.of_timesteps(t.to(unet_input.device), self.num_timesteps.float())
                stack.enter_context(conditioned_on(self.context, embedding))
            return self.unet(unet_input)

    def clean_forward(self, inputs: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """UNet output for nnU-Net's (clean) input, at timestep CLEAN_IMAGE_TIMESTEP when time-conditioned."""
        t = None
        if self.time_embedding is not None:
            t = torch.full((inputs.shape[0],), CLEAN_IMAGE_TIMESTEP, device=inputs.device, dtype=torch.long)
        return self.backbone_forward(inputs[:, :self.num_image_channels], inputs, t)


class PretrainingNetwork(PretrainedBackbone):
    """The pretext network: `forward(image, corrupted, t)` predicts the pretext target (ε or the clean patch).

    Called like a segmentation network, `forward(image)`, it raises: a pretraining checkpoint has no
    segmentation output, it is the input of a probe or fine-tuning trainer.
    """

    def __init__(self, unet: nn.Module, spec: BackboneSpec, num_image_channels: int, num_timesteps: int | None):
        super().__init__(unet, spec, num_image_channels)
        # Without deep supervision only the last output layer is used; frozen, the others cannot stall DDP.
        unet.decoder.seg_layers[:-1].requires_grad_(False)
        self.holds_pretrained_weights.fill_(True)
        if spec.time_conditioning:
            self.num_timesteps.fill_(num_timesteps)

    def forward(self, inputs: torch.Tensor, corrupted: torch.Tensor | None = None, t: torch.Tensor | None = None
                ) -> torch.Tensor:
        """inputs: nnU-Net's batch (image channels, then coordinates if any); corrupted: the noisy or distorted
        image channels."""
        if corrupted is None:
            raise PretrainingCheckpointNotASegmenter(
                "this is a pretraining checkpoint, not a segmentation model, so nnUNetv2_predict cannot use it. "
                f"Train a probe on it first: nnUNetv2_train DATASET CONFIGURATION FOLD -tr "
                f"{' | '.join(self.spec.probe_trainers)} -pretrained_weights <this checkpoint_final.pth>, "
                f"then predict with that probe trainer")
        return self.backbone_forward(corrupted, inputs, t)


class ProbeNetwork(PretrainedBackbone):
    """Backbone + head: `forward(image)` → logits (B, classes, *spatial), as nnU-Net's predictor expects.

    Features are the outputs of every decoder stage (captured with forward hooks) for the clean image at
    timestep CLEAN_IMAGE_TIMESTEP (and its coordinates, for a coordinate-guided backbone). With `freeze_backbone` the
    backbone never gets gradients and stays in eval mode even when nnU-Net calls `network.train()`.
    """

    def __init__(self, unet: nn.Module, spec: BackboneSpec, num_image_channels: int, head: nn.Module,
                 freeze_backbone: bool):
        super().__init__(unet, spec, num_image_channels)
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

    def decoder_features(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the UNet's decoder stages for nnU-Net's input, coarsest first."""
        captured: list[torch.Tensor] = []
        hooks = [stage.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
                 for stage in self.unet.decoder.stages]
        try:
            self.clean_forward(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.freeze_backbone else nullcontext():
            features = self.decoder_features(inputs)
        return self.head(features, inputs.shape[2:])


class FinetuneNetwork(PretrainedBackbone):
    """The pretrained network as a segmentation network: `forward(image)` → the UNet's logits for the clean
    image at timestep CLEAN_IMAGE_TIMESTEP (and its coordinates); with deep supervision a list over the decoder
    stages, finest first, as nnU-Net's loss expects.

    `num_timesteps` (time-conditioned backbones) is the T that embeds timestep 0 until `-pretrained_weights`
    replaces it by the checkpoint's, along with every other tensor but the output layers (`unet.decoder.seg_layers`).
    """

    def __init__(self, unet: nn.Module, spec: BackboneSpec, num_image_channels: int, num_timesteps: int | None):
        super().__init__(unet, spec, num_image_channels)
        if spec.time_conditioning:
            self.num_timesteps.fill_(num_timesteps)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.clean_forward(inputs)


def decoder_level_channels(unet: nn.Module) -> list[int]:
    """Channels of the decoder stage outputs, coarsest first (each stage outputs its skip's width)."""
    encoder_channels = unet.encoder.output_channels
    return [encoder_channels[-(stage + 2)] for stage in range(len(unet.decoder.stages))]


def _build_unet(spec: BackboneSpec, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                num_input_channels: int, num_outputs: int | None = None, deep_supervision: bool = False
                ) -> tuple[nn.Module, int]:
    """The planned UNet reading every input channel, with `num_outputs` output channels (default: one pretext
    output per image channel); and how many image channels there are."""
    image_channels = spec.image_channels(num_input_channels)
    unet = build_unet_from_plans(plans_manager, configuration_manager, num_input_channels,
                                 num_outputs or image_channels, deep_supervision=deep_supervision)
    return unet, image_channels


def build_pretraining_network(spec: BackboneSpec, plans_manager: PlansManager,
                              configuration_manager: ConfigurationManager, num_input_channels: int,
                              num_timesteps: int | None) -> PretrainingNetwork:
    unet, image_channels = _build_unet(spec, plans_manager, configuration_manager, num_input_channels)
    return PretrainingNetwork(unet, spec, image_channels, num_timesteps)


def build_probe_network(spec: BackboneSpec, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                        num_input_channels: int, num_classes: int, head_kind: str, freeze_backbone: bool
                        ) -> ProbeNetwork:
    """A probe whose backbone keys and shapes equal those of `build_pretraining_network(spec, ...)`."""
    unet, image_channels = _build_unet(spec, plans_manager, configuration_manager, num_input_channels)
    heads = {"linear": LinearProbeHead, "nonlinear": NonLinearProbeHead}
    if head_kind not in heads:
        raise ValueError(f"unknown probe head {head_kind!r}; choose one of {', '.join(heads)}")
    head = heads[head_kind](decoder_level_channels(unet), num_classes, len(configuration_manager.patch_size))
    return ProbeNetwork(unet, spec, image_channels, head, freeze_backbone)


def build_finetune_network(spec: BackboneSpec, plans_manager: PlansManager,
                           configuration_manager: ConfigurationManager, num_input_channels: int, num_classes: int,
                           deep_supervision: bool, num_timesteps: int | None) -> FinetuneNetwork:
    """A segmentation network whose keys and shapes equal those of `build_pretraining_network(spec, ...)` except
    the output layers (`unet.decoder.seg_layers`, one per class)."""
    unet, image_channels = _build_unet(spec, plans_manager, configuration_manager, num_input_channels, num_classes,
                                       deep_supervision)
    return FinetuneNetwork(unet, spec, image_channels, num_timesteps)
