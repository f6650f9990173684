"""Both benchmarks in one command: one workspace, one header naming the machine, one Markdown table of ratios.

    python bench/run_all.py                                   # generated dataset, cpu_tiny plans, CPU
    python bench/run_all.py --device cuda --dataset 500 --preset cpu_small --checkpoint .../checkpoint_final.pth

All options of bench_training.py and bench_sampling.py apply.
"""
from __future__ import annotations

import argparse

from bench_sampling import add_sampling_arguments, sampling_benchmark_from_args, sampling_notes, sampling_rows
from bench_training import add_training_arguments, training_benchmark_from_args, training_notes, training_rows
from benchutil import add_common_arguments, configure_device, environment_lines, benchmark_table, workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_training_arguments(parser)
    add_sampling_arguments(parser)
    args = parser.parse_args()
    device = configure_device(args)
    with workspace(args) as space:
        training = training_benchmark_from_args(space, device, args)
        sampling = sampling_benchmark_from_args(space, device, args)
        header = environment_lines(device, space) + training_notes(training) + sampling_notes(sampling)
    print("\n".join(["## nnunet-diffusion benchmark (ratios measured side by side in one run)", ""] + header))
    print()
    print(benchmark_table(training_rows(training) + sampling_rows(sampling)))


if __name__ == "__main__":
    main()
