"""CPU-only speed-ups of the denoiser that change no weight and no result: PyTorch picks a slow convolution kernel
for two shapes the plugin meets all the time on the CPU (the wide-input first convolution, one sliding-window tile).
On CUDA both are no-ops.
"""
from __future__ import annotations

import torch
from torch import nn

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
    native kernel instead of oneDNN: the cpu_tiny denoiser takes about three times as long for one 32³ tile as for
    two (docs/benchmarks.md, `python bench/bench_single_tile.py`). The copy is dropped afterwards; every layer is
    per sample, so the result is the same up to float rounding."""
    return x.shape[0] == 1 and x.device.type == "cpu" and not torch.is_grad_enabled()
