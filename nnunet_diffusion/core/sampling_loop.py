"""The sampling loop: K DDIM or DDPM steps from noise to a segmentation, as a plain function of a denoiser, a
scheduler and a mask codec (diffusers keeps it in a pipeline, MONAI in an inferer).

`DiffusionSegmentationNetwork.forward` calls it in eval mode, so nnU-Net's predictor still makes one `network(tile)`
call per sliding-window tile and mirror; per-step evaluation iterates over `sample_steps` itself.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from nnunet_diffusion.core.masks import MaskCodec, full_resolution, noisy_mask_to_input
from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.core.scheduler import DiffusionScheduler

# (image, x_t, t, previous x0 estimate or None) → x0 logits, or nnU-Net's deep-supervision list of them
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                    torch.Tensor | list[torch.Tensor]]


def sample_steps(denoise: Denoiser, scheduler: DiffusionScheduler, codec: MaskCodec, image: torch.Tensor,
                 settings: SamplerSettings) -> Iterator[torch.Tensor]:
    """Yield the x0 logits (B, C, *spatial) of every sampling step, from seeded or fresh noise; stop early once
    the labels change by at most `settings.early_exit_tolerance` between two steps."""
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=image.device).manual_seed(settings.seed)
    shape = (image.shape[0], codec.num_channels, *image.shape[2:])
    x_t = torch.randn(shape, generator=generator, device=image.device, dtype=torch.float32)
    timesteps = scheduler.set_timesteps(settings.steps)
    previous_x0, previous_labels = None, None
    for t in timesteps.tolist():
        condition = noisy_mask_to_input(previous_x0) if previous_x0 is not None else None
        logits = denoise(image, x_t, torch.full((image.shape[0],), t, device=image.device), condition)
        logits = full_resolution(logits).float()
        x0 = codec.decode(logits)
        yield logits
        if settings.early_exit_tolerance is not None:
            labels = codec.hard_labels(logits)
            if previous_labels is not None and \
                    changed_label_fraction(labels, previous_labels) <= settings.early_exit_tolerance:
                return
            previous_labels = labels
        previous_x0 = x0
        x_t = scheduler.step(x0, t, x_t, settings.sampler, generator).prev_sample


def sample(denoise: Denoiser, scheduler: DiffusionScheduler, codec: MaskCodec, image: torch.Tensor,
           settings: SamplerSettings) -> torch.Tensor:
    """Run the whole loop and return the last step's x0 logits: the prediction."""
    logits = None
    for logits in sample_steps(denoise, scheduler, codec, image, settings):
        pass
    return logits


def changed_label_fraction(labels: torch.Tensor, previous: torch.Tensor) -> float:
    """Early exit's criterion: the fraction of voxels (of region channels, for regions) whose label differs between
    two consecutive x0 estimates. Probabilities always drift somewhere; what a user sees is the label map."""
    return (labels != previous).float().mean().item()
