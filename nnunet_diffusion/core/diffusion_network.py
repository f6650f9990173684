"""The network nnU-Net trains and predicts with: a time-conditioned denoiser around nnU-Net's planned UNet.

In training mode `forward(image, x_t, t)` is one denoising pass (x0 logits, nnU-Net's deep-supervision list when
on). In eval mode `forward(image)` runs the whole sampler (`sampling_loop.sample`) and returns the last step's x0
logits, so nnU-Net's sliding-window predictor, mirroring, `--save_probabilities`, ensembling and final validation
work unchanged, with one network call per tile.

The network carries its default sampling (steps, sampler, early exit) as buffers, so a checkpoint predicts with
the settings its trainer recommended when it was trained, whatever later versions recommend; the
`nnUNet_diffusion_*` variables override each of them. A checkpoint written before these buffers existed samples
as it did then: DDIM over all T steps.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from nnunet_diffusion.core import sampling_loop
from nnunet_diffusion.core.cpu_workarounds import pads_single_sample, speed_up_input_convolution
from nnunet_diffusion.core.masks import MaskCodec, noisy_mask_to_input
from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.core.scheduler import SAMPLERS, DiffusionScheduler
from nnunet_diffusion.core.time_conditioning import TimeContext, TimeEmbedding, add_time_conditioning, conditioned_on


DEFAULT_SAMPLING_BUFFERS = ("default_sampling_steps", "default_sampler", "default_early_exit")
NO_EARLY_EXIT = -1.0


def is_default_sampling_key(key: str) -> bool:
    """Whether a state-dict key (with any wrapper prefix) is one of the default-sampling buffers, which
    checkpoints written before they existed lack."""
    return key.rpartition(".")[2] in DEFAULT_SAMPLING_BUFFERS


class DiffusionSegmentationNetwork(nn.Module):
    """Denoiser f(image, x_t, t[, x̂0_prev]) → x0 logits; in eval mode `forward(image)` samples a segmentation."""

    def __init__(self, unet: nn.Module, num_image_channels: int, codec: MaskCodec, alphas_cumprod: torch.Tensor,
                 self_conditioning: bool = False, time_conditioning: bool = True, embedding_dim: int = 128,
                 default_sampling: SamplerSettings | None = None):
        super().__init__()
        self.num_image_channels = num_image_channels
        self.codec = codec
        self.self_conditioning = self_conditioning
        self.scheduler = DiffusionScheduler(alphas_cumprod)
        self.context = TimeContext()
        self.time_embedding: TimeEmbedding | None = None
        if time_conditioning:
            add_time_conditioning(unet, embedding_dim, self.context)
            self.time_embedding = TimeEmbedding(embedding_dim)
        self.unet = unet
        speed_up_input_convolution(unet, num_image_channels + codec.num_channels * (2 if self_conditioning else 1))
        self.set_deep_supervision_enabled(unet.decoder.deep_supervision)
        # Part of the state dict so that the predictor, which never sees dataset.json, decodes masks correctly.
        self.register_buffer("uses_sigmoid", torch.tensor(codec.activation == "sigmoid"))
        self.sampler_settings: SamplerSettings | None = None  # None: the defaults and nnUNet_diffusion_* decide
        self.register_buffer("default_sampling_steps", torch.tensor(0))
        self.register_buffer("default_sampler", torch.tensor(0))
        self.register_buffer("default_early_exit", torch.tensor(NO_EARLY_EXIT))  # float32: mps has no float64
        self.set_default_sampling(default_sampling or SamplerSettings("ddim", self.num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.num_train_timesteps

    @property
    def num_mask_channels(self) -> int:
        return self.codec.num_channels

    def set_default_sampling(self, settings: SamplerSettings) -> None:
        """What plain `nnUNetv2_predict` runs with this network (saved in its checkpoint); never a seed."""
        if settings.steps > self.num_timesteps:
            raise ValueError(f"a default of {settings.steps} sampling steps exceeds the {self.num_timesteps} "
                             f"timesteps of this network; set the trainer's default_sampling_steps to 1..T")
        self.default_sampling_steps.fill_(settings.steps)
        self.default_sampler.fill_(SAMPLERS.index(settings.sampler))
        tolerance = settings.early_exit_tolerance
        self.default_early_exit.fill_(NO_EARLY_EXIT if tolerance is None else tolerance)

    @property
    def default_sampling(self) -> SamplerSettings:
        tolerance = round(float(self.default_early_exit), 6)
        return SamplerSettings(SAMPLERS[int(self.default_sampler)], int(self.default_sampling_steps), None,
                               None if tolerance == NO_EARLY_EXIT else tolerance)

    def prediction_settings(self) -> SamplerSettings:
        """This network's default sampling with every `nnUNet_diffusion_*` variable that is set applied on top."""
        return SamplerSettings.from_environment(self.num_timesteps, self.default_sampling)

    @contextmanager
    def sampling_with(self, settings: SamplerSettings) -> Iterator[None]:
        """Sample with `settings` instead of the environment's in the block: for code that runs nnU-Net's
        predictor in its own process (the stock commands always read the environment)."""
        self.sampler_settings = settings.checked_for(self.num_timesteps)
        try:
            yield
        finally:
            self.sampler_settings = None

    def set_mask_activation(self, activation: str) -> None:
        """Called by the trainer once it knows whether labels are regions (sigmoid) or classes (softmax)."""
        self.codec = MaskCodec(self.codec.num_channels, activation, self.codec.ignore_label)
        self.uses_sigmoid.fill_(activation == "sigmoid")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint without the default-sampling buffers (written before they existed) gets all T steps."""
        if not any(prefix + name in state_dict for name in DEFAULT_SAMPLING_BUFFERS):
            self.set_default_sampling(SamplerSettings("ddim", self.num_timesteps))
            state_dict = {**state_dict, **{prefix + name: getattr(self, name) for name in DEFAULT_SAMPLING_BUFFERS}}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.codec = MaskCodec(self.codec.num_channels, "sigmoid" if bool(self.uses_sigmoid) else "softmax",
                               self.codec.ignore_label)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """Without deep supervision only the last segmentation head is used: the lower-resolution heads are frozen,
        as DDP (nnU-Net wraps with find_unused_parameters=False) would otherwise wait for their gradients."""
        self.unet.decoder.deep_supervision = enabled
        for head in self.unet.decoder.seg_layers[:-1]:
            head.requires_grad_(enabled)

    def denoise(self, image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                self_condition: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """One network evaluation: x0 logits for the noisy mask x_t at timesteps t (one per sample); with deep
        supervision on, nnU-Net's list of logits at every decoder resolution."""
        inputs = [image, noisy_mask_to_input(x_t).to(image.dtype)]
        if self.self_conditioning:
            inputs.append(torch.zeros_like(inputs[1]) if self_condition is None else self_condition.to(image.dtype))
        unet_input = torch.cat(inputs, dim=1)
        padded = pads_single_sample(unet_input)
        if padded:
            unet_input, t = unet_input.expand(2, *unet_input.shape[1:]), t.expand(2)
        if self.time_embedding is None:
            output = self.unet(unet_input)
        else:
            with conditioned_on(self.context, self.time_embedding.of_timesteps(t.to(image.device),
                                                                               self.num_timesteps)):
                output = self.unet(unet_input)
        if not padded:
            return output
        return [o[:1] for o in output] if isinstance(output, (list, tuple)) else output[:1]

    def forward(self, image: torch.Tensor, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None,
                self_condition: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        if x_t is not None:
            if t is None:
                raise ValueError("a noisy mask x_t needs its timesteps t")
            return self.denoise(image, x_t, t, self_condition)
        if self.training:
            raise RuntimeError("in training mode the network needs (image, x_t, t); sampling runs in eval mode")
        if not torch.isfinite(image).all():
            raise ValueError("the image holds NaN or inf voxels after nnU-Net's preprocessing, so every sampled "
                             "probability would be NaN; replace them in the input image (e.g. numpy.nan_to_num)")
        logits = self.sample(image, self.sampler_settings or self.prediction_settings())
        # with deep supervision on (nnU-Net's validation during training) the caller expects a list, full
        # resolution first; sampling produces only that one
        return [logits] if self.unet.decoder.deep_supervision else logits

    def sample(self, image: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
        """Run the sampler from pure noise and return the last step's x0 logits (B, C, *spatial)."""
        return sampling_loop.sample(self.denoise, self.scheduler, self.codec, image, settings)

    def sample_steps(self, image: torch.Tensor, settings: SamplerSettings) -> Iterator[torch.Tensor]:
        """Yield the x0 logits of every sampling step (for per-step evaluation and early exit)."""
        return sampling_loop.sample_steps(self.denoise, self.scheduler, self.codec, image, settings)
