"""`nnunet-diffusion ablate`: train what is missing with the stock nnUNetv2_train, then compare every trainer.

For each trainer and fold, the model folder decides: `checkpoint_final.pth` (nnU-Net writes it only when
training ended) → skip; `checkpoint_latest.pth` or `checkpoint_best.pth` → resume with `--c`; nothing → train.
The baseline (default: the stock `nnUNetTrainer`) is always included. All models are then evaluated as by
`nnunet-diffusion evaluate` (per step, sampler and seed, with the final step's probabilities kept), and every
diffusion model is also ensembled with the baseline by averaging probabilities with nnU-Net's own ensembling
(`nnunetv2.ensembling.ensemble.merge_files`, what `nnUNetv2_ensemble` runs per case), for each sampler and seed.

Written to the output folder: `ablation.csv/json/md` (one row per model or ensemble and sampler: means over
cases and seeds of the final prediction), the outputs of `evaluate` (per-step tables and plots), and the
ensembles' segmentations under `ensembles/`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_diffusion.environment import plugin_command
from nnunet_diffusion.evaluation.ablation import TrainingError, ablate
from nnunet_diffusion.evaluation.evaluate import add_prediction_arguments, options_from_args


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, as for nnUNetv2_train")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer classes to compare")
    parser.add_argument("--baseline", default="nnUNetTrainer",
                        help="non-diffusion trainer, always trained and ensembled with each diffusion trainer")
    parser.add_argument("-i", "--images", required=True, help="test images, nnU-Net naming (<case>_0000.nii.gz)")
    parser.add_argument("-r", "--reference", required=True, help="reference segmentations (<case>.nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="folder for tables, plots and predictions")
    add_prediction_arguments(parser)
    args = parser.parse_args(argv)
    with plugin_command("ablate", ValueError, TrainingError):
        ablate(args.dataset, args.configuration, args.plans, args.trainers, args.baseline, Path(args.images),
               Path(args.reference), Path(args.output), options_from_args(args, save_probabilities=True))
    print(f"wrote {Path(args.output) / 'ablation.md'}, ablation.csv, ablation.json")
    return 0
