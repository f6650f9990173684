"""`nnunet-diffusion crossval`: compare trainers by k-fold cross-validation on a planned dataset.

Folds are nnU-Net's `splits_final.json` in the preprocessed dataset; without one, nnU-Net's own seeded split is
written, over groups of cases with --group-by (e.g. 'patient\\d+' keeps ACDC's two frames of a patient in one
fold). Every trainer (the baseline, default nnUNetTrainer, always included) is trained on every fold with
nnU-Net's own loop; --repeats N adds independent trainings (their own results folder and seed) for
--repeat-trainers on --repeat-folds, so that the spread between trainings is measured, not only the spread
between cases. A fold whose checkpoint_final.pth exists is not trained again, and one with nnU-Net's
checkpoint_latest.pth is resumed from it (point --results-root at your nnUNet_results to compare folds you
trained with nnUNetv2_train).

Where the work runs (--executor): `inline` (default) trains one unit after another, each in a fresh process, and
predicts under this command; `local --jobs N [--gpus 0 1 …]` runs N trainings or predictions at once on this
machine, each on its own GPU; `slurm` submits every training as a job, the held-out prediction of a unit as a job
that starts when its training has succeeded, and the report as a job after them, then returns. A job stopped by
the scheduler (time limit, pre-emption) is requeued and resumes from nnU-Net's latest checkpoint (--save-every
sets how often nnU-Net writes it). Re-run the same command at any time: it submits only what is neither finished
nor queued or running; --dry-run prints every unit's state and the GPU-hours of what a run would submit;
--report-only rewrites the report from what exists and lists what is missing.

Learning curves over labelled cases: --train-cases 5 10 20 trains every fold's models on 5, 10 and 20 of the
fold's training cases (a subset drawn per fold and repeat with the unit's seed, nested across N and the same for
every trainer; with --repeats 2, two draws), scores them on the fold's unchanged held-out cases, and writes one
study per N to <output>/train_cases_<N> and Dice against N with each N's paired differences to
<output>/learning_curve.md (.json with the subsets, .png). --pretrained-weights TRAINER=CHECKPOINT starts a
trainer from a pretraining checkpoint, as `nnUNetv2_train -pretrained_weights` does ('{fold}' in the path is the
fold), e.g. nnUNetTrainerPretrainedFinetune against nnUNetTrainerPretrainedFinetuneRandomInit.

Each fold's held-out cases are predicted with nnU-Net's predictor: diffusion models once per sampler and seed,
every sampling step scored; a non-diffusion model is read from nnU-Net's own fold validation
(`validation/summary.json`) when that holds what the comparison needs (mirroring on, and probabilities from
`nnUNetv2_train --npz` when ensembles need them), else predicted. Every diffusion model is ensembled with the
baseline of its fold (nnU-Net's probability averaging). With --postprocessing, every final prediction (ensembles
too) is also scored after nnU-Net's postprocessing, decided on its fold's held-out cases as
`nnUNetv2_determine_postprocessing` decides it (rows `<model> (postprocessed)`, and the same comparisons).

Written to --output:
- `results.md`: held-out Dice per model and sampler (mean ± sd over cases, per class, HD95, the sd between
  repeated trainings), paired per-case differences (mean, 95 % bootstrap interval, Wilcoxon signed-rank p, the
  verdict at --margin), fold by fold, Dice per sampling step, the seed spread per step (with ≥ 2 seeds),
  pseudo-Dice per epoch, training loss per timestep, wall clock, and what is missing
- `results.json` (all of it, with the splits and every training's record), `per_case.csv`
- `pseudo_dice.png`, `dice_vs_step_<sampler>.png`, `loss_per_timestep.png`
- `units/<trainer>/repeat_<r>/fold_<f>/` (each training's predictions, scores, ensembles, and `jobs/` with its
  job records and logs)

The scores alone resume a run elsewhere: a fold whose trainings are gone counts as finished when `units/` holds
the scores of all its trainers and ensembles with the same settings (keep `units/**/unit.json`,
`units/**/ensemble.json` and `units/**/postprocessed.json`, not the predictions); in a fold with anything
missing, every trainer whose training is gone is trained again.
"""
from __future__ import annotations

import argparse

from nnunet_diffusion.environment import plugin_command
from nnunet_diffusion.evaluation.commands.comparison_arguments import (add_study_arguments, comparison_from_args,
                                                                         written_report)
from nnunet_diffusion.evaluation.scheduling import run_comparison
from nnunet_diffusion.evaluation.splits import NNUNET_SPLIT_SEED
from nnunet_diffusion.evaluation.unit_scoring import ComparisonError
from nnunet_diffusion.training import TrainingError


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion crossval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser, folds=[0, 1, 2, 3, 4], seeds=(0,))
    parser.add_argument("--num-folds", type=int, default=5, help="folds of a split written by this command "
                        f"(nnU-Net's seeded split, seed {NNUNET_SPLIT_SEED}; default 5)")
    parser.add_argument("--group-by", metavar="REGEX", help="cases whose names share the first match of REGEX are "
                        "held out together, e.g. 'patient\\d+'")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    with plugin_command("crossval", ValueError, ComparisonError, TrainingError, FileNotFoundError):
        comparison, execution = comparison_from_args(args, None, num_folds=args.num_folds,
                                                     group_pattern=args.group_by)
        summary = run_comparison(comparison, execution)
    if summary:
        print(written_report(args))
    return 0
