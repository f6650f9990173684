"""Pretraining measured as nnU-Net users use it: the whole pretrained network fine-tuned on N labelled cases, as a
learning curve over N, against the same network fine-tuned from random weights and against stock nnU-Net.

    python experiments/pretraining_finetune.py hippocampus --workdir /work/runs/fewlabels \
        --kept experiments/results/pretraining/finetune_hippocampus_epochs_20
    python experiments/pretraining_finetune.py phantom --workdir /work/runs/fewlabels_phantom \
        --kept experiments/results/pretraining/finetune_phantom_epochs_20

`hippocampus`: the 200 shared MR cases as nnU-Net dataset 523, split into two folds by nnU-Net's seeded split.
Fold 0's 100 training cases are the pool: the restorative and the diffusion x0 (T = 10) pretraining train on
their images only (labels unused; the held-out cases never seen), with the plugin's runner. Then one
`nnunet-diffusion crossval --train-cases 5 10 20 40 --repeats 2` trains, on N cases of the pool (two subset
draws per N, the same cases for every arm), each pretraining fine-tuned (`nnUNetTrainerPretrainedFinetuneRestore`,
`nnUNetTrainerPretrainedFinetune`: warm-up then poly from 1e-3, deep supervision), the random-init control
(`nnUNetTrainerPretrainedFinetuneRandomInit`: the same network and schedule without the weights) and stock
`nnUNetTrainer` (the reference line), all at one budget (20 epochs × 100 iterations; at 10 × 100 stock's
validation pseudo-Dice on 5 cases was still rising steeply), and scores them on fold 0's 100 held-out cases; the
learning curve is `<workdir>/hippocampus_epochs_<E>/learning_curve.md`.

`phantom`: the coordinate half of the claim under fine-tuning. The phantom datasets of docs/pretraining.md
(`datasets.pretraining_study.prepare_phantom`: 24 unlabelled pretraining phantoms, a BPR trained on them, 10
labelled phantoms and 16 test phantoms from another seed, both with the BPR's coordinate channels); the diffusion
x0 pretraining (T = 10) with and without coordinates on the pretraining phantoms; then one `nnunet-diffusion
ablate --train-cases 2 4 8 --repeats 2` per input (the labelled phantoms, and the same with coordinates), each the
fine-tuning, its random-init control and stock nnU-Net, scored on the 16 test phantoms; `coordinates.md` pairs
the two curves at each N (`evaluation.learning_curve.paired_across_curves`).

The run resumes where it stopped; `--kept DIR` restores the scores kept in DIR before it runs and copies scores
and tables back after it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from recycling_crossval import SHARED_DATA, copy_kept, nnunet_env

from nnunet_diffusion.datasets.pretraining_study import PhantomStudyDatasets, StudyDataset, StudyFolders, \
    prepare_phantom
from nnunet_diffusion.evaluation.learning_curve import paired_across_curves
from nnunet_diffusion.evaluation.splits import load_or_write_splits
from nnunet_diffusion.evaluation.study import dataset_cases
from nnunet_diffusion.training import TrainingRun, run_arguments
from nnunet_diffusion.utils import TrainingBudget, markdown_table

HIPPOCAMPUS = StudyDataset(523, "HippocampusFewLabels")
PHANTOM = PhantomStudyDatasets(StudyDataset(602, "PhantomPretrain"), StudyDataset(612, "PhantomPretrainCoord"),
                               StudyDataset(601, "Phantom"), StudyDataset(611, "PhantomCoord"),
                               StudyDataset(621, "PhantomTrueCoord"))
PRESET, PLANS, CONFIGURATION = "cpu_tiny", "nnUNetPlansCPU", "3d_cpu"
RANDOM_INIT = "nnUNetTrainerPretrainedFinetuneRandomInit"
# Hippocampus: each fine-tuning trainer and the pretraining whose checkpoint it starts from
FINETUNED = {"nnUNetTrainerPretrainedFinetuneRestore": "nnUNetTrainerRestorePretrain",
             "nnUNetTrainerPretrainedFinetune": "nnUNetTrainerDiffPretrainX0"}
# phantom: input suffix ("" or "Coord") → the probe dataset and the pretraining (dataset, trainer)
PHANTOM_INPUTS = {"": (PHANTOM.probe, PHANTOM.pretrain, "nnUNetTrainerDiffPretrainX0"),
                  "Coord": (PHANTOM.probe_coord, PHANTOM.pretrain_coord, "nnUNetTrainerDiffPretrainCoordX0")}
KEPT_SCORES = tuple(f"**/train_cases_*/units/**/{name}" for name in ("unit.json", "ensemble.json"))
KEPT_FILES = (*KEPT_SCORES, "**/train_cases_*/results.*", "**/train_cases_*/per_case.csv", "**/learning_curve.*",
              "coordinates.*")


def train(workdir: Path, dataset: StudyDataset, trainer: str, budget: TrainingBudget, device: str) -> Path:
    """Fold 0 of `dataset` trained by the plugin's runner into `<workdir>/pretraining` (skipped when finished,
    resumed when interrupted); returns the fold folder."""
    run = TrainingRun(dataset.folder, CONFIGURATION, 0, trainer, PLANS, budget, 0, device,
                      results=str(workdir / "pretraining"))
    command = [sys.executable, "-m", "nnunet_diffusion.training", *run_arguments(run)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, env={**nnunet_env(workdir), "nnUNet_results": run.results}, check=True)
    return run.fold_folder


def comparison(command: str, dataset: StudyDataset, trainers: list[str], weights: dict[str, str], output: Path,
               args: argparse.Namespace, *extra: str) -> list[str]:
    """One `crossval` or `ablate` learning curve: every arm at the budget, N cases and draws of the arguments, each
    arm also against every arm before it."""
    pairs = [f"{a}:{b}" for i, a in enumerate(trainers) for b in trainers[:i]]
    return ["nnunet-diffusion", command, "-d", str(dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS,
            "-tr", *trainers, "-f", "0", "--epochs", str(args.budget[0]), "--iterations", str(args.budget[1]),
            "--val-iterations", str(args.budget[2]), "--train-cases", *map(str, args.train_cases),
            "--repeats", str(args.draws), "--pretrained-weights", *(f"{t}={w}" for t, w in weights.items()),
            "--compare", *pairs,
            "--samplers", "ddim", "--disable-tta", "-device", args.device, "-o", str(output), *extra]


def hippocampus_commands(workdir: Path, output: Path, args: argparse.Namespace) -> list[list[str]]:
    """The shared cases linked and planned, the two-fold split written before any training (so that the
    pretraining and every fine-tuning see the same pool), the two pretrainings, then the learning curve."""
    folders = StudyFolders(workdir / "raw", workdir / "preprocessed", run_nnunet(workdir), PRESET)
    if not folders.raw(HIPPOCAMPUS).exists():
        folders.raw_root.mkdir(parents=True, exist_ok=True)
        folders.raw(HIPPOCAMPUS).symlink_to((args.data / "msd_hippocampus").resolve())
    folders.plan_with_preset(HIPPOCAMPUS)
    preprocessed = folders.preprocessed(HIPPOCAMPUS)
    load_or_write_splits(preprocessed, dataset_cases(preprocessed, ".nii.gz"), 2, None)
    weights = {finetune: str(train(workdir, HIPPOCAMPUS, pretraining, TrainingBudget(*args.pretrain_budget),
                                   args.device).parent / "fold_{fold}" / "checkpoint_final.pth")
               for finetune, pretraining in FINETUNED.items()}
    return [comparison("crossval", HIPPOCAMPUS, [RANDOM_INIT, *FINETUNED], weights, output, args, "--num-folds",
                       "2")]


def phantom_commands(workdir: Path, output: Path, args: argparse.Namespace) -> list[list[str]]:
    """The phantom datasets with the BPR's coordinates, the two pretrainings, then one learning curve per input
    on the labelled phantoms' test cases."""
    folders = StudyFolders(workdir / "raw", workdir / "preprocessed", run_nnunet(workdir), PRESET)
    bpr_budget = TrainingBudget(args.bpr_iterations // 100, 100, 10)
    prepare_phantom(folders, PHANTOM, 24, 10, 16, lambda dataset: train(
        workdir, dataset, "nnUNetTrainerBPR", bpr_budget, args.device) / "checkpoint_final.pth")
    commands = []
    for suffix, (probe, pretraining_dataset, pretraining) in PHANTOM_INPUTS.items():
        finetune = f"nnUNetTrainerPretrainedFinetune{suffix}"
        checkpoint = train(workdir, pretraining_dataset, pretraining, TrainingBudget(*args.pretrain_budget),
                           args.device) / "checkpoint_final.pth"
        commands.append(comparison("ablate", probe, [f"{RANDOM_INIT}{suffix}", finetune], {finetune: str(checkpoint)},
                                   output / (suffix.lower() or "no_coordinates"), args,
                                   "-i", str(folders.raw(probe) / "imagesTs"), "-r", str(folders.raw(probe) / "labelsTs")))
    return commands


def coordinates_page(output: Path, margin: float) -> str:
    """With − without coordinates at each N, for the fine-tuning and for its random-init control."""
    rows = []
    for trainer in ("nnUNetTrainerPretrainedFinetune", RANDOM_INIT, "nnUNetTrainer"):
        coord = trainer if trainer == "nnUNetTrainer" else f"{trainer}Coord"
        rows += [[d["train_cases"], f"{coord} − {trainer}", d["cases"], f"{d['mean']:+.3f}",
                  f"[{d['interval_low']:+.3f}, {d['interval_high']:+.3f}]", f"{d['p_signed_rank']:.2g}",
                  f"{d['a_better']}/{d['cases']}", d["verdict"]]
                 for d in paired_across_curves(output / "coord", coord, output / "no_coordinates", trainer, margin)]
    return ("# With − without coordinate channels, per number of labelled phantoms\n\n"
            f"Paired per test phantom (95 % bootstrap interval, signed-rank p, verdict at ±{margin:g} Dice); the "
            "stock row is nnU-Net reading the coordinates as image channels.\n\n"
            + markdown_table(["N", "A − B", "cases", "mean", "95 % interval", "p", "A higher", "verdict"], rows) + "\n")


def run_nnunet(workdir: Path):
    return lambda command: subprocess.run(command, env=nnunet_env(workdir), check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("hippocampus", "phantom"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--train-cases", type=int, nargs="+", help="default: 5 10 20 40 (phantom: 2 4 8)")
    parser.add_argument("--draws", type=int, default=2, help="subset draws per N (--repeats)")
    parser.add_argument("--pretrain-budget", type=int, nargs=3, default=[10, 100, 10],
                        metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"))
    parser.add_argument("--budget", type=int, nargs=3, default=[20, 100, 10],
                        metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"), help="every fine-tuning arm's")
    parser.add_argument("--bpr-iterations", type=int, default=600, help="phantom: the BPR's training")
    parser.add_argument("--margin", type=float, default=0.005)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kept", type=Path, help="scores kept from an earlier run, restored before and updated after")
    args = parser.parse_args(argv)
    args.train_cases = args.train_cases or ([5, 10, 20, 40] if args.dataset == "hippocampus" else [2, 4, 8])
    workdir = args.workdir.resolve()
    os.environ.update(nnunet_env(workdir))  # before nnU-Net is imported: it reads its folders once
    output = workdir / f"{args.dataset}_epochs_{args.budget[0]}"
    if args.kept is not None:
        print(f"restored {copy_kept(args.kept, output, KEPT_SCORES)} kept score file(s) into {output}")
    commands = (hippocampus_commands if args.dataset == "hippocampus" else phantom_commands)(workdir, output, args)
    finished = True
    for command in commands:
        print("$ " + " ".join(command), flush=True)
        finished = subprocess.run(command, env=nnunet_env(workdir)).returncode == 0 and finished
    if args.dataset == "phantom" and all((output / name).is_dir() for name in ("coord", "no_coordinates")):
        (output / "coordinates.md").write_text(coordinates_page(output, args.margin), encoding="utf-8")
    if args.kept is not None:
        print(f"kept {copy_kept(output, args.kept, KEPT_FILES)} file(s) in {args.kept}")
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
