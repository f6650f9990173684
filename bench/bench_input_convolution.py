"""The first convolution of a diffusion network, in nnU-Net's memory layout and from a channels-last input.

The denoiser's first 3D convolution reads image + mask channels; oneDNN's speed for that shape depends on the
memory layout of its input, and how much differs between torch releases and thread counts. This benchmark times
one forward and backward (weight gradient; the input needs none) of that convolution both ways, paired round by
round, so that the network's layout rule (`speed_up_input_convolution` in core/cpu_workarounds.py) follows a
measurement on the torch that is installed.

    python bench/bench_input_convolution.py --threads 1 2 --sizes 32 64 --channels 4 --features 8 16 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchutil import benchmark_table, paired_ratio, result_row


def convolution_step(channels: int, size: int, features: int, batch: int):
    """One training step of the input convolution; `channels_last` chooses the layout its input arrives in."""
    convolution = torch.nn.Conv3d(channels, features, 3, padding=1)
    image = torch.randn(batch, channels, size, size, size)
    gradient = torch.randn(batch, features, size, size, size)

    def step(channels_last: bool) -> None:
        x = image.contiguous(memory_format=torch.channels_last_3d) if channels_last else image
        convolution(x).contiguous().backward(gradient)
    return step


def time_layouts(step, rounds: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per step in nnU-Net's layout and channels-last; each round runs both, alternating which goes first."""
    plain, channels_last = [], []
    for round_index in range(warmup + rounds):
        order = (False, True) if round_index % 2 == 0 else (True, False)
        for layout in order:
            start = time.perf_counter()
            step(layout)
            seconds = time.perf_counter() - start
            if round_index >= warmup:
                (channels_last if layout else plain).append(seconds)
    return plain, channels_last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48], help="cubic patch edge lengths")
    parser.add_argument("--channels", type=int, default=4, help="input channels: image + mask channels")
    parser.add_argument("--features", type=int, nargs="+", default=[32],
                        help="output channels of the convolution (nnU-Net's first stage: 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for features in args.features:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for size in args.sizes:
                step = convolution_step(args.channels, size, features, args.batch)
                plain, channels_last = time_layouts(step, args.rounds, args.warmup)
                ratio, low, high = paired_ratio(channels_last, plain)
                compared = (f"channels-last / nnU-Net's layout, Conv3d({args.channels}, {features}, 3), "
                            f"{threads} thread(s), {args.batch}×{args.channels}×{size}³")
                rows.append(result_row("input convolution", compared,
                                       f"{ratio:.2f} [{low:.2f}, {high:.2f}]",
                                       f"{statistics.median(plain) * 1e3:.1f} ms in nnU-Net's layout"))
    print(f"- torch {torch.__version__}; {args.rounds} paired rounds after {args.warmup} warm-up rounds, forward + "
          f"weight gradient of the convolution; ratio: median [95 % bootstrap interval]")
    print()
    print(benchmark_table(rows))


if __name__ == "__main__":
    main()
