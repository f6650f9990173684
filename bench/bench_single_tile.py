"""One sliding-window tile through the denoiser on the CPU: as a batch of one, and padded to two samples.

nnU-Net's predictor feeds one tile at a time, and PyTorch runs narrow convolutions of a single sample through its
native kernel instead of oneDNN. The denoiser therefore runs a no-grad CPU forward of one sample as a batch of two
(`pads_single_sample` in core/cpu_workarounds.py); this benchmark times both, paired round by round, on the
cpu_tiny and cpu_small feature widths.

    python bench/bench_single_tile.py --threads 1 2 --sizes 32 48
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from benchutil import benchmark_table, paired_ratio, result_row
from nnunet_diffusion.core import diffusion_network as network_module
from nnunet_diffusion.core.masks import MaskCodec
from nnunet_diffusion.core.schedules import make_alphas_cumprod

CLASSES = 3


def denoiser(base_features: int, max_features: int) -> network_module.DiffusionSegmentationNetwork:
    """A 4-stage 3D denoiser as the CPU presets derive it (image + mask channels in, x0 logits out)."""
    unet = PlainConvUNet(1 + CLASSES, 4, [min(base_features * 2 ** i, max_features) for i in range(4)],
                         torch.nn.Conv3d, 3, [1, 2, 2, 2], 2, CLASSES, 2, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    return network_module.DiffusionSegmentationNetwork(unet, 1, MaskCodec(CLASSES), make_alphas_cumprod("linear", 5)
                                                       ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48], help="cubic tile edge lengths")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for base, top in ((8, 64), (16, 128)):
        net = denoiser(base, top)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for size in args.sizes:
                image, x_t = torch.randn(1, 1, size, size, size), torch.randn(1, CLASSES, size, size, size)
                t = torch.zeros(1, dtype=torch.long)
                single, padded = [], []
                for round_index in range(args.warmup + args.rounds):
                    for pad in ((False, True) if round_index % 2 == 0 else (True, False)):
                        with torch.inference_mode(), mock.patch.object(network_module, "pads_single_sample",
                                                                       lambda x, pad=pad: pad):
                            start = time.perf_counter()
                            net.denoise(image, x_t, t)
                            seconds = time.perf_counter() - start
                        if round_index >= args.warmup:
                            (padded if pad else single).append(seconds)
                ratio, low, high = paired_ratio(padded, single)
                rows.append(result_row("single tile", f"padded to 2 / batch of 1, features {base}–{top}, "
                                       f"{threads} thread(s), {size}³", f"{ratio:.2f} [{low:.2f}, {high:.2f}]",
                                       f"{statistics.median(single) * 1e3:.1f} ms as a batch of 1, "
                                       f"{statistics.median(padded) * 1e3:.1f} ms padded"))
    print(f"- torch {torch.__version__}; {args.rounds} paired rounds after {args.warmup} warm-up rounds, one "
          f"no-grad denoiser forward; ratio: median [95 % bootstrap interval]")
    print()
    print(benchmark_table(rows))


if __name__ == "__main__":
    main()
