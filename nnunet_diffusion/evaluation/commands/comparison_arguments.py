"""The arguments `crossval` and `ablate` share (what to compare, how to train and predict, where the jobs run)
and the comparison they describe."""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_diffusion.evaluation.comparison import Comparison
from nnunet_diffusion.evaluation.options import (ExecutionOptions, add_execution_arguments, add_sampling_arguments,
                                                 execution_from_args, options_from_args)
from nnunet_diffusion.evaluation.study import Study
from nnunet_diffusion.utils import TrainingBudget


def _trainer_epochs(text: str) -> tuple[str, int]:
    trainer, _, epochs = text.partition("=")
    if not trainer or not epochs.isdigit() or int(epochs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not TRAINER=EPOCHS with EPOCHS ≥ 1, e.g. "
                                         f"nnUNetTrainerDiffRecycleFinetune=5")
    return trainer, int(epochs)


def _model_pair(text: str) -> tuple[str, str]:
    a, _, b = text.partition(":")
    if not a or not b or a == b:
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B of two models, e.g. nnUNetTrainerDiffRecycleFinetune:"
                                         f"nnUNetTrainerStockContinue")
    return a, b


def _pretrained_weights(text: str) -> tuple[str, str]:
    trainer, _, path = text.partition("=")
    if not trainer or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not TRAINER=CHECKPOINT, e.g. nnUNetTrainerPretrainedFinetune="
                                         f"pretraining/fold_{{fold}}/checkpoint_final.pth")
    return trainer, path


def add_study_arguments(parser: argparse.ArgumentParser, folds: list[int], seeds: tuple[int, ...]) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, as for nnUNetv2_train")
    parser.add_argument("-c", "--configuration", required=True, help="e.g. 3d_fullres, or 3d_cpu of a preset")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer classes to compare")
    parser.add_argument("--baseline", default="nnUNetTrainer", help="non-diffusion trainer, trained on every "
                        "fold and ensembled with each diffusion trainer (default: nnUNetTrainer)")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=folds)
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
                        "crossval <output>/results, ablate $nnUNet_results); further runs go to "
                        "<results-root>/crossval_repeat_<r>")
    parser.add_argument("--postprocessing", action="store_true", help="also score every final prediction after "
                        "nnU-Net's postprocessing (largest connected component where it helps), decided per fold")
    parser.add_argument("--compare", nargs="+", default=[], metavar="A:B", type=_model_pair,
                        help="further paired differences A − B to report (trainers, or 'TRAINER + BASELINE' for an "
                        "ensemble), beyond each trainer against the baseline and each ensemble against its members")
    parser.add_argument("--pretrained-weights", nargs="+", default=[], metavar="TRAINER=CHECKPOINT",
                        type=_pretrained_weights, help="the checkpoint a trainer starts from, as nnUNetv2_train's "
                        "-pretrained_weights ('{fold}' in the path is replaced by the fold)")
    parser.add_argument("--train-cases", nargs="+", type=int, default=[], metavar="N",
                        help="a learning curve: train every fold's models on N of the fold's training cases, for "
                        "each N (a seeded subset per fold and repeat, nested across N, the same for every "
                        "trainer; held-out cases unchanged); one study per N in <output>/train_cases_<N>, and "
                        "learning_curve.md/json/png in <output>")
    parser.add_argument("--margin", type=float, default=0.005, help="equivalence margin in Dice for the verdicts: "
                        "inside ±margin is on par (default 0.005)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    add_sampling_arguments(parser, samplers=("ddim", "ddpm"), seeds=seeds)
    add_execution_arguments(parser)


def comparison_from_args(args: argparse.Namespace, default_results: Path | None, test_images: Path | None = None,
                         test_labels: Path | None = None, num_folds: int = 5, group_pattern: str | None = None
                         ) -> tuple[Comparison, ExecutionOptions]:
    """The comparison the arguments describe; trainer names are resolved (and the baseline checked) first."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_diffusion.trainer_lookup import diffusion_trainers
    if not nnUNet_raw or not nnUNet_preprocessed:
        raise ValueError("nnUNet_raw and nnUNet_preprocessed must be set, as for nnUNetv2_train")
    try:
        dataset = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    execution = execution_from_args(args)
    args.folds = [str(f) for f in args.folds]
    budget = None if args.epochs is None else TrainingBudget(args.epochs, args.iterations, args.val_iterations)
    trainers = tuple(dict.fromkeys(args.trainers))
    output = args.output.resolve()
    results = args.results_root or default_results or output / "results"
    study = Study(dataset, args.configuration, args.plans, trainers, args.baseline, tuple(int(f) for f in args.folds),
                  output, Path(results).resolve(), options_from_args(args, save_probabilities=True), budget,
                  args.repeats, tuple(args.repeat_trainers), tuple(args.repeat_folds), num_folds, group_pattern,
                  diffusion_trainers(trainers, args.baseline), tuple(args.trainer_epochs), args.postprocessing,
                  args.margin, test_images is not None, tuple(args.compare), tuple(args.pretrained_weights),
                  learning_curve=tuple(args.train_cases))
    return Comparison(study, Path(nnUNet_raw) / dataset, Path(nnUNet_preprocessed) / dataset,
                      None if test_images is None else test_images.resolve(),
                      None if test_labels is None else test_labels.resolve()), execution


def written_report(args: argparse.Namespace) -> str:
    """What a finished comparison wrote, for the command's last line."""
    if args.train_cases:
        return (f"wrote {args.output / 'learning_curve.md'}, learning_curve.json, learning_curve.png (each N's "
                f"results in {args.output / 'train_cases_<N>'})")
    return f"wrote {args.output / 'results.md'}, results.json, per_case.csv"
