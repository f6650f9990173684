"""The recycling claims of Fu et al. by cross-validation on the shared real datasets: dataset recipes (raw layout,
nnU-Net's planning, the CPU preset) and the `nnunet-diffusion crossval` invocations of each study.

    python experiments/recycling_crossval.py hippocampus curves --workdir /work/runs/hippocampus
    python experiments/recycling_crossval.py hippocampus cv --workdir /work/runs/hippocampus --epochs 10

Studies (each one `nnunet-diffusion crossval` command, printed before it runs; resumable):
- `curves`: fold 0, stock / Diff / Recycle trained for each of --curve-epochs (separate trainings, nnU-Net's
  poly learning rate over each budget), held-out Dice per budget: where each curve levels off.
- `cv`: every fold, stock / Diff / Recycle / RecycleAllT at --epochs, a second training of stock, Diff and
  Recycle on folds 0 and 1 (the spread between trainings), the ensembles with stock.
- `seeds`: fold 0 of the `cv` models, 5 sampling seeds: the largest Dice difference across seeds per step.

Everything goes under --workdir: `raw/`, `preprocessed/`, `<study>/` (the crossval outputs and their trainings).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_diffusion.plans import plan_and_preprocess_with_preset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STOCK, DIFF, RECYCLE, RECYCLE_ALL_T = ("nnUNetTrainer", "nnUNetTrainerDiff", "nnUNetTrainerDiffRecycle",
                                       "nnUNetTrainerDiffRecycleAllT")


@dataclass(frozen=True)
class Recipe:
    """A shared dataset as nnU-Net sees it here: id, source folder in nnU-Net's raw layout, preset, configuration."""
    dataset_id: int
    name: str
    source: str
    preset: str
    configuration: str
    plans: str
    group_by: str | None = None


RECIPES = {
    # 3d_fullres at 1 mm; cpu_tiny's 32³ patch covers most of a ~36 × 50 × 35 crop, 8–64 features.
    "hippocampus": Recipe(521, "Hippocampus", "msd_hippocampus", "cpu_tiny", "3d_cpu", "nnUNetPlansCPU"),
    # two frames per patient: folds grouped by patient
    "acdc": Recipe(522, "ACDC", "acdc", "cpu_tiny", "3d_cpu", "nnUNetPlansCPU", r"patient\d+"),
}


def nnunet_env(workdir: Path) -> dict[str, str]:
    return {**os.environ, "nnUNet_raw": str(workdir / "raw"), "nnUNet_preprocessed": str(workdir / "preprocessed"),
            "nnUNet_results": str(workdir / "results"), "nnUNet_def_n_proc": "2"}


def prepare(recipe: Recipe, workdir: Path, data: Path) -> None:
    """nnU-Net's raw dataset (a link to the shared one), planned and preprocessed, with the preset's plans."""
    raw = workdir / "raw" / f"Dataset{recipe.dataset_id:03d}_{recipe.name}"
    raw.parent.mkdir(parents=True, exist_ok=True)
    if not raw.exists():
        raw.symlink_to((data / recipe.source).resolve())
    preprocessed = workdir / "preprocessed" / raw.name
    if not (preprocessed / f"{recipe.plans}.json").is_file():
        env = nnunet_env(workdir)

        def run(command: list[str]) -> None:
            subprocess.run(command, env=env, check=True)
        plan_and_preprocess_with_preset(recipe.dataset_id, recipe.preset, workdir / "preprocessed", run)


def crossval(recipe: Recipe, workdir: Path, output: str, trainers: list[str], folds: list[int], epochs: int,
             args: argparse.Namespace, *extra: str) -> list[str]:
    command = ["nnunet-diffusion", "crossval", "-d", str(recipe.dataset_id), "-c", recipe.configuration, "-p",
               recipe.plans, "-tr", *trainers, "-f", *map(str, folds), "--epochs", str(epochs), "--iterations",
               str(args.iterations), "--val-iterations", str(args.val_iterations), "--disable-tta", "-o",
               str(workdir / output), *extra]
    if recipe.group_by:
        command += ["--group-by", recipe.group_by]
    return command


def study_commands(recipe: Recipe, study: str, workdir: Path, args: argparse.Namespace) -> list[list[str]]:
    if study == "curves":
        return [crossval(recipe, workdir, f"curves/epochs_{e}", [DIFF, RECYCLE], [0], e, args)
                for e in args.curve_epochs]
    cv_output = f"cv/epochs_{args.epochs}"
    if study == "cv":
        return [crossval(recipe, workdir, cv_output, [DIFF, RECYCLE, RECYCLE_ALL_T], args.folds, args.epochs, args,
                         "--repeats", "2", "--repeat-trainers", STOCK, DIFF, RECYCLE, "--repeat-folds", "0", "1")]
    return [crossval(recipe, workdir, f"seeds/epochs_{args.epochs}", [DIFF, RECYCLE], [0], args.epochs, args,
                     "--seeds", "0", "1", "2", "3", "4", "--results-root", str(workdir / cv_output / "results"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(RECIPES))
    parser.add_argument("study", choices=("curves", "cv", "seeds"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--epochs", type=int, default=10, help="budget of the cv and seeds studies")
    parser.add_argument("--curve-epochs", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--val-iterations", type=int, default=20)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args(argv)
    recipe, workdir = RECIPES[args.dataset], args.workdir.resolve()
    prepare(recipe, workdir, args.data)
    for command in study_commands(recipe, args.study, workdir, args):
        print("$ " + " ".join(command), flush=True)
        if subprocess.run(command, env=nnunet_env(workdir)).returncode:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
