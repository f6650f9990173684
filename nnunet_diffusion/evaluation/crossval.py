"""`nnunet-diffusion crossval`: compare trainers by k-fold cross-validation on a planned dataset.

Folds are nnU-Net's `splits_final.json` in the preprocessed dataset; without one, nnU-Net's own seeded split is
written, over groups of cases with --group-by (e.g. 'patient\\d+' keeps ACDC's two frames of a patient in one
fold). Every trainer (the baseline, default nnUNetTrainer, always included) is trained on every fold with
nnU-Net's own loop, one training at a time, each in a fresh process; --repeats N adds independent trainings
(their own results folder and seed) for --repeat-trainers on --repeat-folds, so that the spread between
trainings is measured, not only the spread between cases. A fold whose checkpoint_final.pth exists is not
trained again (point --results-root at your nnUNet_results to compare folds you trained with nnUNetv2_train).

Each fold's held-out cases are predicted with nnU-Net's predictor: diffusion models once per sampler and seed,
every sampling step scored; a non-diffusion model is read from nnU-Net's own fold validation
(`validation/summary.json`) when that holds what the comparison needs (mirroring on, and probabilities from
`nnUNetv2_train --npz` when ensembles need them), else predicted. Every diffusion model is ensembled with the
baseline of its fold (nnU-Net's probability averaging). With --postprocessing, every final prediction (ensembles
too) is also scored after nnU-Net's postprocessing, decided on its fold's held-out cases as
`nnUNetv2_determine_postprocessing` decides it (rows `<model> (postprocessed)`, and the same comparisons).

Written to --output (rewritten after every training, and resumable: finished trainings, predictions and ensembles
are skipped on a rerun with the same settings):
- `results.md`: held-out Dice per model and sampler (mean ± sd over cases, per class, HD95, the sd between
  repeated trainings), paired per-case differences (mean, 95 % bootstrap interval, Wilcoxon signed-rank p),
  Dice per sampling step, the seed spread per step (with ≥ 2 seeds), pseudo-Dice per epoch, training loss per
  timestep, wall clock
- `results.json` (all of it, with the splits and every training's record), `per_case.csv`
- `pseudo_dice.png`, `dice_vs_step_<sampler>.png`, `loss_per_timestep.png`
- `units/<trainer>/repeat_<r>/fold_<f>/` (each training's predictions, scores, ensembles), `logs/`

Trainings go fold by fold (every trainer of a fold, then the next fold), so an interrupted run leaves whole folds.
The scores alone resume a run elsewhere: a fold whose trainings are gone counts as finished when `units/` holds
the scores of all its trainers and ensembles with the same settings (keep `units/**/unit.json`,
`units/**/ensemble.json` and `units/**/postprocessed.json`, not the predictions); in a fold with anything
missing, every trainer whose training is gone is trained again. A kept fold scored without --postprocessing
stands without its postprocessed scores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_diffusion.environment import plugin_command
from nnunet_diffusion.evaluation.cross_validation import (CrossValidation, CrossValidationError,
                                                          run_cross_validation)
from nnunet_diffusion.evaluation.evaluate import add_sampling_arguments, options_from_args
from nnunet_diffusion.evaluation.splits import NNUNET_SPLIT_SEED
from nnunet_diffusion.utils import TrainingBudget


def diffusion_trainers(names: list[str]) -> frozenset[str]:
    """The names nnU-Net's own lookup resolves to diffusion trainers; a name it cannot find is an error."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_diffusion.trainers.segmentation import nnUNetTrainerDiff
    found = set()
    for name in names:
        try:
            cls = recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            raise ValueError(f"nnU-Net finds no trainer class {name!r} (neither in nnunetv2 nor in the plugin)") \
                from None
        if issubclass(cls, nnUNetTrainerDiff):
            found.add(name)
    return frozenset(found)


def _trainer_epochs(text: str) -> tuple[str, int]:
    trainer, _, epochs = text.partition("=")
    if not trainer or not epochs.isdigit() or int(epochs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not TRAINER=EPOCHS with EPOCHS ≥ 1, e.g. "
                                         f"nnUNetTrainerDiffRecycleFinetune_2epochs=2")
    return trainer, int(epochs)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion crossval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, as for nnUNetv2_train")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 3d_fullres, or 3d_cpu of a preset")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer classes to compare")
    parser.add_argument("--baseline", default="nnUNetTrainer", help="non-diffusion trainer, trained on every "
                        "fold and ensembled with each diffusion trainer (default: nnUNetTrainer)")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--num-folds", type=int, default=5, help="folds of a split written by this command "
                        f"(nnU-Net's seeded split, seed {NNUNET_SPLIT_SEED}; default 5)")
    parser.add_argument("--group-by", metavar="REGEX", help="cases whose names share the first match of REGEX are "
                        "held out together, e.g. 'patient\\d+'")
    parser.add_argument("--repeats", type=int, default=1, help="training runs per unit (default 1)")
    parser.add_argument("--repeat-trainers", nargs="+", default=[], help="trainers of the further runs "
                        "(default: all)")
    parser.add_argument("--repeat-folds", nargs="+", type=int, default=[], help="folds of the further runs "
                        "(default: all)")
    parser.add_argument("--epochs", type=int, help="training budget: epochs (default: each trainer's own)")
    parser.add_argument("--trainer-epochs", nargs="+", default=[], metavar="TRAINER=EPOCHS", type=_trainer_epochs,
                        help="epochs of these trainers instead of --epochs, iterations as the budget's (e.g. "
                        "fine-tuning at a fraction of the from-scratch budget)")
    parser.add_argument("--iterations", type=int, default=250, help="iterations per epoch with --epochs (250)")
    parser.add_argument("--val-iterations", type=int, default=50, help="validation batches per epoch with "
                        "--epochs (50)")
    parser.add_argument("--results-root", type=Path, help="nnUNet_results of the first training run (default: "
                        "<output>/results); further runs go to <results-root>/crossval_repeat_<r>")
    parser.add_argument("--postprocessing", action="store_true", help="also score every final prediction after "
                        "nnU-Net's postprocessing (largest connected component where it helps), decided fold by fold")
    parser.add_argument("-o", "--output", type=Path, required=True)
    add_sampling_arguments(parser, samplers=("ddim", "ddpm"), seeds=(0,), device="cpu")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    with plugin_command("crossval", ValueError, CrossValidationError, FileNotFoundError):
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        if not nnUNet_raw or not nnUNet_preprocessed:
            raise ValueError("nnUNet_raw and nnUNet_preprocessed must be set, as for nnUNetv2_train")
        try:
            dataset = maybe_convert_to_dataset_name(args.dataset)
        except RuntimeError as error:
            raise ValueError(str(error)) from None
        args.folds = [str(f) for f in args.folds]
        budget = None if args.epochs is None else TrainingBudget(args.epochs, args.iterations, args.val_iterations)
        trainers = tuple(dict.fromkeys(args.trainers))
        output = args.output.resolve()
        cv = CrossValidation(dataset, args.configuration, args.plans, trainers, args.baseline,
                             tuple(int(f) for f in args.folds), output,
                             (args.results_root or output / "results").resolve(),
                             options_from_args(args, save_probabilities=True), budget, args.repeats,
                             tuple(args.repeat_trainers), tuple(args.repeat_folds), args.num_folds, args.group_by,
                             diffusion_trainers([args.baseline, *trainers]), tuple(args.trainer_epochs),
                             args.postprocessing)
        run_cross_validation(cv, Path(nnUNet_raw) / dataset, Path(nnUNet_preprocessed) / dataset)
    print(f"wrote {args.output / 'results.md'}, results.json, per_case.csv")
    return 0

