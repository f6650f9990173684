"""Time-conditioned denoising networks built from nnU-Net plans, and the segmentation wrapper the predictor calls.

The denoiser is nnU-Net's own planned architecture (PlainConvUNet, ResidualEncoderUNet, ...: same stages,
kernels, strides and features) with extra input channels. Time conditioning replaces every normalisation layer
by the same layer followed by a per-channel scale/shift (FiLM) computed from a sinusoidal timestep embedding; the
projections start at zero, so an untrained conditioned network equals the plain one. (The reference code adds
the embedding *before* InstanceNorm, which removes it; `time_conditioning=False` reproduces that behaviour.)

In eval mode `forward(image)` runs the whole sampler and returns the last step's x0 logits, so nnU-Net's
sliding-window predictor, mirroring, `--save_probabilities`, ensembling and final validation work unchanged.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from nnunet_diffusion.core.masks import MaskCodec, full_resolution, noisy_mask_to_input
from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.core.scheduler import DiffusionScheduler

TIME_SCALE = 1000.0  # timesteps are embedded as (t + 1) / T · TIME_SCALE, so any T covers the same range


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style embedding of continuous timesteps (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeContext:
    """Holds the current timestep embedding for the FiLM layers of one network (deliberately not a Module)."""

    def __init__(self) -> None:
        self.embedding: torch.Tensor | None = None


class TimeEmbedding(nn.Sequential):
    """Sinusoidal embedding of the timestep followed by an MLP: the vector every FiLMNorm of a network reads."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.dim = dim

    def of_timesteps(self, t: torch.Tensor, num_timesteps: int | torch.Tensor) -> torch.Tensor:
        """(B,) integer timesteps of a T-step schedule → (B, dim); t is embedded as (t + 1) / T · TIME_SCALE."""
        return self(sinusoidal_embedding((t.float() + 1) / num_timesteps * TIME_SCALE, self.dim))


@contextmanager
def conditioned_on(context: TimeContext, embedding: torch.Tensor) -> Iterator[None]:
    """Let the FiLM layers sharing `context` read `embedding` for the calls inside the block, and only there."""
    context.embedding = embedding
    try:
        yield
    finally:
        context.embedding = None


class FiLMNorm(nn.Module):
    """A normalisation layer followed by a timestep-dependent per-channel scale and shift."""

    def __init__(self, norm: nn.Module, num_channels: int, embedding_dim: int, context: TimeContext):
        super().__init__()
        self.norm = norm
        self.to_scale_shift = nn.Linear(embedding_dim, 2 * num_channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)
        self._context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self._context.embedding
        if embedding is None:
            raise RuntimeError("time-conditioned layer called without a timestep; call the wrapper network, "
                               "not its inner UNet")
        scale, shift = self.to_scale_shift(embedding).chunk(2, dim=1)
        if _is_plain_instance_norm(self.norm):
            return self._fused_instance_norm(x, 1 + scale, shift)
        shape = (x.shape[0], -1) + (1,) * (x.ndim - 2)
        return self.norm(x) * (1 + scale.reshape(shape)).to(x.dtype) + shift.reshape(shape).to(x.dtype)

    def _fused_instance_norm(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Instance norm whose per-sample affine already holds the FiLM scale/shift: one op, no extra activation
        kept for backward (the plain product costs ~30% more training memory)."""
        norm = self.norm
        channels = x.shape[1]
        weight = norm.weight if norm.affine else torch.ones(channels, device=x.device)
        bias = norm.bias if norm.affine else torch.zeros(channels, device=x.device)
        sample_weight = (weight[None] * scale).reshape(-1)
        sample_bias = (bias[None] * scale + shift).reshape(-1)
        merged = x.reshape(1, x.shape[0] * channels, *x.shape[2:])
        return nn.functional.instance_norm(merged, weight=sample_weight, bias=sample_bias,
                                           eps=norm.eps).reshape(x.shape)


def _is_plain_instance_norm(norm: nn.Module) -> bool:
    """InstanceNorm without running statistics normalises every (sample, channel) on its own."""
    return isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats


def norm_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm and InstanceNorm
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None


def add_time_conditioning(network: nn.Module, embedding_dim: int, context: TimeContext) -> int:
    """Wrap every normalisation layer of `network` in FiLMNorm, in place; returns how many were wrapped."""
    wrappers: dict[int, FiLMNorm] = {}  # a norm can have two parents (e.g. `.norm` and `.all_modules[i]`)
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            channels = norm_channels(child)
            if channels is not None:
                if id(child) not in wrappers:
                    wrappers[id(child)] = FiLMNorm(child, channels, embedding_dim, context)
                setattr(parent, name, wrappers[id(child)])
    if not wrappers:
        raise ValueError(f"{type(network).__name__} has no BatchNorm/InstanceNorm/GroupNorm layer to condition on "
                         f"the timestep; use a time-unconditioned trainer variant")
    return len(wrappers)


CHANNELS_LAST_MIN_INPUT_CHANNELS = 4
CHANNELS_LAST_MAX_OUTPUT_FEATURES = 16


def _channels_last_input_on_cpu(conv: nn.Module, args: tuple) -> tuple | None:
    """On CPU the input convolution gets a channels-last input (see `speed_up_input_convolution`)."""
    x = args[0]
    if x.device.type == "cpu" and x.ndim == 5:
        return (x.contiguous(memory_format=torch.channels_last_3d),)
    return None


def _contiguous_output(conv: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Back to nnU-Net's layout, so the rest of the network runs exactly as in the stock trainer."""
    return output.contiguous()


def speed_up_input_convolution(unet: nn.Module, num_input_channels: int) -> None:
    """Layout hooks on the first 3D convolution (image + mask channels) where oneDNN is faster from a channels-last
    input: with ≥ 4 input channels and ≤ 16 output features (the CPU presets) forward + weight gradient take
    0.4–0.8 × the time; with nnU-Net's default 32 features they take 1.4–1.6 × at 64³ and more, so those plans
    keep nnU-Net's layout (`python bench/bench_input_convolution.py --features 8 16 32`). A CPU-only layout
    change: no new weights, the same results."""
    first = next((m for m in unet.modules() if isinstance(m, nn.Conv3d) and m.in_channels == num_input_channels),
                 None)
    if first is not None and num_input_channels >= CHANNELS_LAST_MIN_INPUT_CHANNELS and \
            first.out_channels <= CHANNELS_LAST_MAX_OUTPUT_FEATURES:
        first.register_forward_pre_hook(_channels_last_input_on_cpu)
        first.register_forward_hook(_contiguous_output)


def pads_single_sample(x: torch.Tensor) -> bool:
    """Whether a no-grad CPU forward of one sample runs as a batch of two. PyTorch sends a narrow convolution of a
    single sample (nnU-Net's predictor feeds one tile at a time; batch × channels × depth × height ≤ 20480) to its
    native kernel instead of oneDNN: the cpu_tiny denoiser takes 51 ms for one 32³ tile and 14 ms for two
    (`python bench/bench_single_tile.py`). The copy is dropped afterwards; every layer is per sample, so the
    result is the same up to float rounding."""
    return x.shape[0] == 1 and x.device.type == "cpu" and not torch.is_grad_enabled()


class DiffusionSegmentationNetwork(nn.Module):
    """Denoiser f(image, x_t, t[, x̂0_prev]) → x0 logits; in eval mode `forward(image)` samples a segmentation."""

    def __init__(self, unet: nn.Module, num_image_channels: int, codec: MaskCodec, alphas_cumprod: torch.Tensor,
                 self_conditioning: bool = False, time_conditioning: bool = True, embedding_dim: int = 128):
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
        self.sampler_settings: SamplerSettings | None = None  # None: the nnUNet_diffusion_* variables decide

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.num_train_timesteps

    @property
    def num_mask_channels(self) -> int:
        return self.codec.num_channels

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
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
                self_condition: torch.Tensor | None = None) -> torch.Tensor:
        if x_t is not None:
            if t is None:
                raise ValueError("a noisy mask x_t needs its timesteps t")
            return self.denoise(image, x_t, t, self_condition)
        if self.training:
            raise RuntimeError("in training mode the network needs (image, x_t, t); sampling runs in eval mode")
        if not torch.isfinite(image).all():
            raise ValueError("the image holds NaN or inf voxels after nnU-Net's preprocessing, so every sampled "
                             "probability would be NaN; replace them in the input image (e.g. numpy.nan_to_num)")
        logits = self.sample(image, self.sampler_settings or SamplerSettings.from_environment(self.num_timesteps))
        # with deep supervision on (nnU-Net's validation during training) the caller expects a list, full
        # resolution first; sampling produces only that one
        return [logits] if self.unet.decoder.deep_supervision else logits

    def sample(self, image: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
        """Run the sampler from pure noise and return the last step's x0 logits (B, C, *spatial)."""
        logits = None
        for logits in self.sample_steps(image, settings):
            pass
        return logits

    def sample_steps(self, image: torch.Tensor, settings: SamplerSettings) -> Iterator[torch.Tensor]:
        """Yield the x0 logits of every sampling step (for per-step evaluation and early exit)."""
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=image.device).manual_seed(settings.seed)
        shape = (image.shape[0], self.num_mask_channels, *image.shape[2:])
        x_t = torch.randn(shape, generator=generator, device=image.device, dtype=torch.float32)
        timesteps = self.scheduler.set_timesteps(settings.steps)
        previous_x0, previous_labels = None, None
        for t in timesteps.tolist():
            condition = noisy_mask_to_input(previous_x0) if previous_x0 is not None else None
            logits = self.denoise(image, x_t, torch.full((image.shape[0],), t, device=image.device), condition)
            logits = full_resolution(logits).float()
            x0 = self.codec.decode(logits)
            yield logits
            if settings.early_exit_tolerance is not None:
                labels = self.codec.hard_labels(logits)
                if previous_labels is not None and \
                        changed_label_fraction(labels, previous_labels) <= settings.early_exit_tolerance:
                    return
                previous_labels = labels
            previous_x0 = x0
            x_t = self.scheduler.step(x0, t, x_t, settings.sampler, generator).prev_sample


def changed_label_fraction(labels: torch.Tensor, previous: torch.Tensor) -> float:
    """Early exit's criterion: the fraction of voxels (of region channels, for regions) whose label differs between
    two consecutive x0 estimates. Probabilities always drift somewhere; what a user sees is the label map."""
    return (labels != previous).float().mean().item()


def build_unet_from_plans(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                          deep_supervision: bool) -> nn.Module:
    """nnU-Net's planned architecture with `num_input_channels` inputs (nnU-Net's own builder, reused)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=deep_supervision)

