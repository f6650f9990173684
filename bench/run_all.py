"""Both benchmarks in one command: one workspace, one header naming the machine, one Markdown table of ratios.

    python bench/run_all.py                                   # generated dataset, cpu_tiny plans, CPU
    python bench/run_all.py --device cuda --dataset 500 --preset cpu_small --checkpoint .../checkpoint_final.pth

All options of bench_training.py and bench_sampling.py apply.
"""
from __future__ import annotations

import argparse

import torch

from bench_sampling import add_sampling_arguments, sampling_benchmark_from_args, sampling_notes, sampling_rows
from bench_training import add_training_arguments, training_benchmark_from_args, training_notes, training_rows
from benchutil import Workspace, benchmark_main


def main() -> None:
    def measure(space: Workspace, device: torch.device, args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
        training = training_benchmark_from_args(space, device, args)
        sampling = sampling_benchmark_from_args(space, device, args)
        return training_notes(training) + sampling_notes(sampling), training_rows(training) + sampling_rows(sampling)

    benchmark_main(__doc__, [add_training_arguments, add_sampling_arguments], measure,
                   "## nnunet-diffusion benchmark (ratios measured side by side in one run)")


if __name__ == "__main__":
    main()
