"""`nnunet-diffusion evaluate`: Dice and HD95 of trained models on a test set, per sampling step, seed and sampler.

Models are nnUNetv2_train output folders of any trainer, ours or stock. A stock model is predicted once; a
diffusion model is predicted once per sampler and seed, and every sampling step's x0 is scored (Fu et al. report
Dice per step, and the max ΔDice across 5 seeds per step). With a fixed seed the sampling trajectory is
deterministic, so step K of these runs is exactly what `nnUNetv2_predict` writes with the same
`nnUNet_diffusion_sampler/steps/seed`. Written to the output folder:

- `results.csv`: mean over cases and seeds per model, sampler and step (foreground mean and per class; with ≥ 2
  seeds also `max_delta_dice`, the per-case max − min Dice across seeds averaged over cases)
- `per_case.csv`, `seed_spread.csv` (per case and step)
- `early_exit.csv` (with --early-exit TOL): per model and sampler, the mean number of steps a network call ran
  (each sliding-window tile and mirror stops on its own), the Dice lost against the full K steps, and the predict
  time per case
- `per_k.csv` and `dice_vs_predict_time.png` (with --per-k): per model and sampler, Dice and predict time per case
  of separate runs with K = 1 … T steps (step k of a K-step run is not a k-step run), the early-exit run, and the
  stock models' one pass: the trade-off a user picks from
- `results.json` (all of the above and the settings), `results.md` (tables for a README)
- `dice_vs_step_<sampler>.png`, `delta_dice_vs_step_<sampler>.png`
- `predictions/<model>[/<sampler>/seed_<s>]/`: the final-step segmentations (with --save-probabilities also
  nnU-Net's .npz/.pkl, so that `nnUNetv2_ensemble` can combine them)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_diffusion.environment import plugin_command
from nnunet_diffusion.evaluation.model_evaluation import evaluate_models
from nnunet_diffusion.evaluation.options import add_step_study_arguments, options_from_args


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--models", nargs="+", required=True,
                        help="trained model folders, <Trainer>__<plans>__<configuration>")
    parser.add_argument("-i", "--images", required=True, help="test images, nnU-Net naming (<case>_0000.nii.gz)")
    parser.add_argument("-r", "--reference", required=True, help="reference segmentations (<case>.nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="folder for tables, plots and predictions")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also keep the final step's probabilities (.npz/.pkl), e.g. for nnUNetv2_ensemble")
    add_step_study_arguments(parser)
    args = parser.parse_args(argv)
    with plugin_command("evaluate"):
        evaluate_models(args.models, args.images, args.reference, args.output,
                        options_from_args(args, args.save_probabilities))
    print(f"wrote {Path(args.output) / 'results.md'}, results.csv, results.json, per_case.csv")
    return 0
