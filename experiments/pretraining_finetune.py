"""Pretraining measured as nnU-Net users use it: the whole pretrained network fine-tuned on N labelled cases, as a
learning curve over N, against the same network fine-tuned from random weights and against stock nnU-Net.

    python experiments/pretraining_finetune.py hippocampus --workdir /work/runs/fewlabels \
        --kept experiments/results/pretraining/finetune_hippocampus_epochs_20

`hippocampus`: the 200 shared MR cases as nnU-Net dataset 523, split into two folds by nnU-Net's seeded split.
Fold 0's 100 training cases are the pool: the restorative and the diffusion x0 (T = 10) pretraining train on
their images only (labels unused; the held-out cases never seen), with the plugin's runner. Then one
`nnunet-diffusion crossval --train-cases 5 10 20 40 --repeats 2` trains, on N cases of the pool (two subset
draws per N, the same cases for every arm), each pretraining fine-tuned (`nnUNetTrainerPretrainedFinetuneRestore`,
`nnUNetTrainerPretrainedFinetune`: warm-up then poly from 1e-3, deep supervision), the random-init control
(`nnUNetTrainerPretrainedFinetuneRandomInit`: the same network and schedule without the weights) and stock
`nnUNetTrainer` (the reference line), all at one budget (20 epochs × 100 iterations; at 10 × 100 stock's
validation pseudo-Dice on 5 cases was still rising steeply), and scores them on fold 0's 100 held-out cases; the
learning curve is `<workdir>/hippocampus_epochs_<E>/learning_curve.md`. The run resumes where it stopped; `--kept DIR`
restores the scores kept in DIR before it runs and copies scores and tables back after it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from recycling_crossval import SHARED_DATA, copy_kept, nnunet_env

from nnunet_diffusion.evaluation.splits import load_or_write_splits
from nnunet_diffusion.evaluation.study import dataset_cases
from nnunet_diffusion.plans import plan_and_preprocess_with_preset
from nnunet_diffusion.training import TrainingRun, run_arguments
from nnunet_diffusion.utils import TrainingBudget

DATASET_ID, DATASET = 523, "Dataset523_HippocampusFewLabels"
PRESET, PLANS, CONFIGURATION = "cpu_tiny", "nnUNetPlansCPU", "3d_cpu"
STOCK, RANDOM_INIT = "nnUNetTrainer", "nnUNetTrainerPretrainedFinetuneRandomInit"
# fine-tuning trainer: the pretraining whose checkpoint it starts from
FINETUNED = {"nnUNetTrainerPretrainedFinetuneRestore": "nnUNetTrainerRestorePretrain",
             "nnUNetTrainerPretrainedFinetune": "nnUNetTrainerDiffPretrainX0"}
KEPT_SCORES = tuple(f"train_cases_*/units/**/{name}" for name in ("unit.json", "ensemble.json"))
KEPT_FILES = (*KEPT_SCORES, "train_cases_*/results.*", "train_cases_*/per_case.csv", "learning_curve.*")


def prepare(workdir: Path, data: Path) -> None:
    """The shared cases as nnU-Net's raw dataset (a link), planned with the preset, and the two-fold split written
    before any training, so that the pretraining and every fine-tuning see the same pool."""
    env = nnunet_env(workdir)
    raw = workdir / "raw" / DATASET
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.symlink_to((data / "msd_hippocampus").resolve())
    preprocessed = workdir / "preprocessed" / DATASET
    if not (preprocessed / f"{PLANS}.json").is_file():
        plan_and_preprocess_with_preset(DATASET_ID, PRESET, workdir / "preprocessed",
                                        lambda command: subprocess.run(command, env=env, check=True))
    load_or_write_splits(preprocessed, dataset_cases(preprocessed, ".nii.gz"), 2, None)


def pretrain(workdir: Path, trainer: str, budget: TrainingBudget, device: str) -> str:
    """Fold 0's pretraining by the plugin's runner (skipped when finished, resumed when interrupted); returns its
    checkpoint as a `--pretrained-weights` path."""
    run = TrainingRun(DATASET, CONFIGURATION, 0, trainer, PLANS, budget, 0, device,
                      results=str(workdir / "pretraining"))
    command = [sys.executable, "-m", "nnunet_diffusion.training", *run_arguments(run)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, env={**nnunet_env(workdir), "nnUNet_results": run.results}, check=True)
    return str(run.fold_folder.parent / "fold_{fold}" / "checkpoint_final.pth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("hippocampus",))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--train-cases", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--draws", type=int, default=2, help="subset draws per N (crossval --repeats)")
    parser.add_argument("--pretrain-budget", type=int, nargs=3, default=[10, 100, 10],
                        metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"))
    parser.add_argument("--budget", type=int, nargs=3, default=[20, 100, 10],
                        metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"), help="every fine-tuning arm's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kept", type=Path, help="scores kept from an earlier run, restored before and updated after")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    output = workdir / f"{args.dataset}_epochs_{args.budget[0]}"
    if args.kept is not None:
        print(f"restored {copy_kept(args.kept, output, KEPT_SCORES)} kept score file(s) into {output}")
    prepare(workdir, args.data)
    weights = {finetune: pretrain(workdir, pretraining, TrainingBudget(*args.pretrain_budget), args.device)
               for finetune, pretraining in FINETUNED.items()}
    restore, diffusion = FINETUNED
    command = ["nnunet-diffusion", "crossval", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-p", PLANS,
               "-tr", RANDOM_INIT, *FINETUNED, "-f", "0", "--num-folds", "2",
               "--epochs", *map(str, args.budget[:1]), "--iterations", str(args.budget[1]),
               "--val-iterations", str(args.budget[2]), "--train-cases", *map(str, args.train_cases),
               "--repeats", str(args.draws), "--pretrained-weights", *(f"{t}={w}" for t, w in weights.items()),
               "--compare", f"{diffusion}:{RANDOM_INIT}", f"{restore}:{RANDOM_INIT}", f"{diffusion}:{restore}",
               "--samplers", "ddim", "--disable-tta", "-device", args.device, "-o", str(output)]
    print("$ " + " ".join(command), flush=True)
    finished = subprocess.run(command, env=nnunet_env(workdir)).returncode == 0
    if args.kept is not None:
        print(f"kept {copy_kept(output, args.kept, KEPT_FILES)} file(s) in {args.kept}")
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
