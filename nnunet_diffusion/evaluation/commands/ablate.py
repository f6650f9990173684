"""`nnunet-diffusion ablate`: train what is missing, then compare every trainer on a test folder.

The same engine as `crossval`, with one test folder as the held-out cases of every fold's model: each trainer
(the baseline, default nnUNetTrainer, always included) is trained on each --folds fold of nnU-Net's split with
nnU-Net's own loop in $nnUNet_results (a fold whose checkpoint_final.pth exists is skipped, one with
checkpoint_latest.pth is resumed, as `nnUNetv2_train --c` does), every fold's model predicts the test images
(diffusion models per sampler and seed, every step scored), every diffusion model is ensembled with the
baseline of its fold (nnU-Net's probability averaging), and the paired per-case differences (averaged over the
folds' models) get an interval, a signed-rank test and the verdict at --margin. --executor, --jobs, --gpus and
the Slurm options run the trainings and predictions as jobs, as for `crossval`.

Written to the output folder: `results.md`, `results.json`, `per_case.csv`, the plots, and `units/` with each
fold model's predictions, ensembles and job logs.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_diffusion.environment import plugin_command
from nnunet_diffusion.evaluation.commands.comparison_arguments import (add_study_arguments, comparison_from_args,
                                                                         written_report)
from nnunet_diffusion.evaluation.scheduling import run_comparison
from nnunet_diffusion.evaluation.unit_scoring import ComparisonError
from nnunet_diffusion.training import TrainingError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser, folds=[0], seeds=(0, 1, 2, 3, 4))
    parser.add_argument("-i", "--images", type=Path, required=True,
                        help="test images, nnU-Net naming (<case>_0000.nii.gz)")
    parser.add_argument("-r", "--reference", type=Path, required=True, help="reference segmentations (<case>.nii.gz)")
    args = parser.parse_args(argv)
    with plugin_command("ablate", ValueError, ComparisonError, TrainingError, FileNotFoundError):
        results = os.environ.get("nnUNet_results")
        if not results and args.results_root is None:
            raise ValueError("nnUNet_results is not set; export it as for nnUNetv2_train")
        comparison, execution = comparison_from_args(args, Path(results) if results else None, args.images,
                                                     args.reference)
        summary = run_comparison(comparison, execution)
    if summary:
        print(written_report(args))
    return 0
