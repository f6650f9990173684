"""The recycling claims of Fu et al. by cross-validation on the shared real datasets: dataset recipes (raw layout
or conversion, nnU-Net's planning, the CPU preset, what is compared) and the `nnunet-diffusion crossval`
invocations of each study.

    python experiments/recycling_crossval.py hippocampus curves --workdir /work/runs/hippo
    python experiments/recycling_crossval.py hippocampus cv --workdir /work/runs/hippo
    python experiments/recycling_crossval.py acdc cv --workdir /work/runs/acdc --patch-size 10 64 64
    python experiments/recycling_crossval.py brats cv --workdir /work/runs/brats
    python experiments/recycling_crossval.py hippocampus finetune --workdir /work/runs/hippo --epochs 20
    python experiments/recycling_crossval.py hippocampus route --workdir /work/runs/hippo

Studies (each one `nnunet-diffusion crossval` command, printed before it runs; resumable):
- `curves`: fold 0, stock / Diff / Recycle trained for each of --curve-epochs (separate trainings, nnU-Net's
  poly learning rate over each budget), held-out Dice per budget: where each curve levels off.
- `cv`: every fold, stock and the recipe's trainers at the recipe's budget (or --epochs), a second training of
  the recipe's repeat trainers (the spread between trainings), the ensembles with stock, each also after
  nnU-Net's postprocessing.
- `seeds`: fold 0 (or --folds) of the `cv` (or, with --seed-models curves, the `curves`) models at --epochs, 5
  sampling seeds: the largest Dice difference across seeds per step. Another fold serves where a machine holds
  that fold's models; missing models are trained first.
- `finetune`: on folds 0 and 1 (or --folds), recycling fine-tuned from the `cv` study's stock model of the fold
  for 2, 5 and 10 epochs (10, 25, 50 % of the 20-epoch budget) at initial learning rate 1e-3, and for 5 epochs at
  nnU-Net's 1e-2, against the `cv` study's stock and from-scratch recycling models (reused, not retrained).
- `route`: every fold, the recommended route against its controls: stock; recycling fine-tuned from the fold's
  stock model and the stock model trained on without diffusion (`nnUNetTrainerStockContinue`), both for a
  quarter of the from-scratch budget at the fine-tuning rate and schedule; recycling from scratch; the ensembles
  with stock, each also after nnU-Net's postprocessing; fine-tuned − continuation and the two ensembles against
  each other beside the engine's own pairs. DDIM only (the default sampler); every model sampled with 5 steps and
  every step scored, so that step 1 (exactly the fine-tuned model's one-step default) and step 5 (the paper's)
  both stand in the per-step table.

Everything goes under --workdir: `raw/`, `preprocessed/`, `<study>/` (the crossval outputs and their trainings).
A run may span machines: `--kept DIR` copies the scores kept in DIR (`units/**/unit.json`, `ensemble.json`, as
`nnunet-diffusion crossval` resumes from them) into the study's output before it runs and copies the study's
scores and tables back to DIR after it; `keep` does the copying back alone, e.g. while a run goes on:

    python experiments/recycling_crossval.py hippocampus cv --workdir /work/runs/hippo --epochs 20 \
        --kept experiments/results/hippocampus/cv_epochs_20
    python experiments/recycling_crossval.py hippocampus keep --workdir /work/runs/hippo --epochs 20 \
        --kept experiments/results/hippocampus/cv_epochs_20 --kept-study cv
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_diffusion.plans import PresetOverrides, plan_and_preprocess_with_preset
from nnunet_diffusion.utils import markdown_table

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STOCK, DIFF, RECYCLE, RECYCLE_ALL_T = ("nnUNetTrainer", "nnUNetTrainerDiff", "nnUNetTrainerDiffRecycle",
                                       "nnUNetTrainerDiffRecycleAllT")
FINETUNE, STOCK_CONTINUE = "nnUNetTrainerDiffRecycleFinetune", "nnUNetTrainerStockContinue"
FINETUNE_ARMS = {"nnUNetTrainerDiffRecycleFinetune_2epochs": 2, "nnUNetTrainerDiffRecycleFinetune_5epochs": 5,
                 "nnUNetTrainerDiffRecycleFinetune_10epochs": 10, "nnUNetTrainerDiffRecycleFinetuneFullLR_5epochs": 5}


@dataclass(frozen=True)
class Recipe:
    """A shared dataset as nnU-Net sees it here, and what its cross-validation compares."""
    dataset_id: int
    name: str
    source: str  # folder of ../shared/data
    preset: str
    configuration: str
    trainers: tuple[str, ...]  # compared with the stock baseline on every fold
    repeat_trainers: tuple[str, ...] = ()  # trained a second time ...
    repeat_folds: tuple[int, ...] = ()  # ... on these folds (all when empty)
    num_folds: int = 5
    group_by: str | None = None
    brats: bool = False  # the source is BraTS 2013 in DeepMedic's layout, converted first
    plans: str = "nnUNetPlansCPU"
    epochs: int = 10
    iterations: int = 250
    val_iterations: int = 20
    samplers: tuple[str, ...] = ("ddim", "ddpm")

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


RECIPES = {
    # 3d_fullres at 1 mm; cpu_tiny's 32³ patch covers most of a ~36 × 50 × 35 crop, 8–64 features; 20 epochs, the
    # shortest budget at which stock's learning curve had levelled off
    "hippocampus": Recipe(521, "Hippocampus", "msd_hippocampus", "cpu_tiny", "3d_cpu",
                          (DIFF, RECYCLE, RECYCLE_ALL_T), (STOCK, DIFF, RECYCLE), (0, 1), epochs=20),
    # nnU-Net plans 3d_fullres for the 10 mm slices; two frames per patient, so folds are grouped by patient; DDIM
    # only: 42 tiles of 10 × 64 × 64 per volume make each sampler ~7 min per model and fold, and on Hippocampus
    # DDPM stayed within 0.001 of DDIM; 40 epochs, as at 20 every model's pseudo-Dice was still rising
    "acdc": Recipe(522, "ACDC", "acdc", "cpu_tiny", "3d_cpu", (DIFF, RECYCLE, RECYCLE_ALL_T), group_by=r"patient\d+",
                   samplers=("ddim",), epochs=40),
    # the 4 cases, each held out once: 2d at 2 mm, whole tumour, 5 × 100 iterations of batch 12
    "brats": Recipe(501, "BraTS2013WT", "brats2013_deepmedic", "cpu_2d", "2d_cpu",
                    ("nnUNetTrainerNoDeepSupervision", DIFF, RECYCLE, "nnUNetTrainerDiffRecycleDS", RECYCLE_ALL_T,
                     "nnUNetTrainerDiffRecycleImportance", "nnUNetTrainerDiffDS"), (STOCK, DIFF, RECYCLE),
                    num_folds=4, brats=True, epochs=5, iterations=100, val_iterations=10),
}


def nnunet_env(workdir: Path) -> dict[str, str]:
    return {**os.environ, "nnUNet_raw": str(workdir / "raw"), "nnUNet_preprocessed": str(workdir / "preprocessed"),
            "nnUNet_results": str(workdir / "results"), "nnUNet_def_n_proc": "2"}


def prepare(recipe: Recipe, workdir: Path, data: Path, patch_size: list[int] | None) -> None:
    """nnU-Net's raw dataset (a link to the shared one, or BraTS converted), planned and preprocessed, with the
    preset's plans fitted to it."""
    env = nnunet_env(workdir)

    def run(command: list[str]) -> None:
        subprocess.run(command, env=env, check=True)
    raw = workdir / "raw" / recipe.dataset
    raw.parent.mkdir(parents=True, exist_ok=True)
    if recipe.brats and not (raw / "dataset.json").is_file():
        run(["nnunet-diffusion", "convert-brats", str(data / recipe.source), "--raw-root", str(raw.parent),
             "--dataset-id", str(recipe.dataset_id), "--spacing", "2", "--whole-tumour"])
    elif not raw.exists():
        raw.symlink_to((data / recipe.source).resolve())
    if not (workdir / "preprocessed" / recipe.dataset / f"{recipe.plans}.json").is_file():
        plan_and_preprocess_with_preset(recipe.dataset_id, recipe.preset, workdir / "preprocessed", run,
                                        overrides=PresetOverrides(patch_size=patch_size and tuple(patch_size)))


def crossval(recipe: Recipe, workdir: Path, output: str, trainers: Sequence[str], folds: Sequence[int],
             args: argparse.Namespace, *extra: str, samplers: Sequence[str] = ()) -> list[str]:
    """One `nnunet-diffusion crossval` command of this recipe (no mirroring at test time, as in the paper)."""
    command = ["nnunet-diffusion", "crossval", "-d", str(recipe.dataset_id), "-c", recipe.configuration, "-p",
               recipe.plans, "-tr", *trainers, "-f", *map(str, folds), "--num-folds", str(recipe.num_folds),
               "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--val-iterations",
               str(args.val_iterations), "--samplers", *(samplers or recipe.samplers), "--disable-tta", "-o",
               str(workdir / output), *extra]
    return command + (["--group-by", recipe.group_by] if recipe.group_by else [])


def study_commands(recipe: Recipe, study: str, workdir: Path, args: argparse.Namespace) -> list[list[str]]:
    folds = args.folds or list(range(recipe.num_folds))
    if study == "curves":
        return [crossval(recipe, workdir, f"curves/epochs_{e}", [DIFF, RECYCLE], [0],
                         argparse.Namespace(**{**vars(args), "epochs": e}))
                for e in args.curve_epochs]
    cv_output = study_output("cv", args)
    if study == "cv":
        repeats = ["--repeats", "2", "--repeat-trainers", *recipe.repeat_trainers] if recipe.repeat_trainers else []
        if recipe.repeat_folds:
            repeats += ["--repeat-folds", *map(str, recipe.repeat_folds)]
        return [crossval(recipe, workdir, cv_output, recipe.trainers, folds, args, *repeats, "--postprocessing")]
    if study == "finetune":
        return [crossval(recipe, workdir, study_output("finetune", args), [RECYCLE, *FINETUNE_ARMS],
                         args.folds or [0, 1], args, "--results-root", str(workdir / cv_output / "results"),
                         "--trainer-epochs", *(f"{t}={e}" for t, e in FINETUNE_ARMS.items()))]
    if study == "route":
        short = max(1, args.epochs // 4)
        return [crossval(recipe, workdir, study_output("route", args), [RECYCLE, FINETUNE, STOCK_CONTINUE], folds,
                         args, "--trainer-epochs", f"{FINETUNE}={short}", f"{STOCK_CONTINUE}={short}",
                         "--compare", f"{FINETUNE}:{STOCK_CONTINUE}", f"{FINETUNE} + {STOCK}:{RECYCLE} + {STOCK}",
                         "--postprocessing", "--steps", "5", samplers=("ddim",))]
    models = cv_output if args.seed_models == "cv" else f"curves/epochs_{args.epochs}"
    return [crossval(recipe, workdir, f"seeds/{models.replace('/', '_')}", [DIFF, RECYCLE], args.folds or [0], args,
                     "--seeds", "0", "1", "2", "3", "4", "--results-root", str(workdir / models / "results"))]


def curves_table(workdir: Path, epochs: Sequence[int]) -> str:
    """Held-out Dice of every model at each budget of the `curves` study, from the crossval outputs' tables."""
    tables = {e: json.loads((workdir / "curves" / f"epochs_{e}" / "results.json").read_text())["table"]
              for e in epochs if (workdir / "curves" / f"epochs_{e}" / "results.json").is_file()}
    rows = list(dict.fromkeys((r["model"], r["sampler"]) for table in tables.values() for r in table))
    cells = {(e, r["model"], r["sampler"]): f"{r['Dice']:.3f} ± {r['Dice_sd']:.3f}" for e, table in tables.items()
             for r in table}
    return markdown_table(["model", "sampler", *(f"{e} epochs" for e in tables)],
                          [[m, s, *(cells.get((e, m, s), "") for e in tables)] for m, s in rows]) + "\n"


KEPT_SCORES = ("units/**/unit.json", "units/**/ensemble.json", "units/**/postprocessed.json")
KEPT_FILES = (*KEPT_SCORES, "results.json", "results.md", "per_case.csv", "*.png")


def copy_kept(source: Path, target: Path, patterns: Sequence[str]) -> int:
    """Copy the files matching `patterns` under source to the same places under target; returns how many."""
    files = [f for pattern in patterns for f in source.glob(pattern) if f.is_file()]
    for file in files:
        (target / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target / file.relative_to(source))
    return len(files)


def study_output(study: str, args: argparse.Namespace) -> str:
    return {"cv": f"cv/epochs_{args.epochs}", "finetune": f"finetune/epochs_{args.epochs}",
            "route": f"route/epochs_{args.epochs}"}[study]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(RECIPES))
    parser.add_argument("study", choices=("curves", "cv", "seeds", "finetune", "route", "keep"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--epochs", type=int, help="budget of the cv and seeds studies (default: the recipe's)")
    parser.add_argument("--curve-epochs", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--iterations", type=int, help="iterations per epoch (default: the recipe's)")
    parser.add_argument("--val-iterations", type=int, help="validation batches per epoch (default: the recipe's)")
    parser.add_argument("--folds", type=int, nargs="+", help="folds of the cv study (default: all), the finetune "
                        "study (default: 0 1) or the seeds study (default: 0)")
    parser.add_argument("--seed-models", choices=("cv", "curves"), default="cv", help="the seeds study's models: "
                        "those of the cv study, or of the curves study, at --epochs")
    parser.add_argument("--patch-size", type=int, nargs="+", help="the preset's patch, fitted by `nnunet-diffusion "
                        "plans --patch-size` (only when the dataset is planned)")
    parser.add_argument("--kept", type=Path, help="cv/finetune/route: scores kept from an earlier run, restored before and "
                        "updated after it")
    parser.add_argument("--kept-study", choices=("cv", "finetune", "route"), default="cv", help="keep: whose scores")
    args = parser.parse_args(argv)
    recipe, workdir = RECIPES[args.dataset], args.workdir.resolve()
    for name in ("epochs", "iterations", "val_iterations"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    if args.study == "keep":
        if args.kept is None:
            parser.error("keep needs --kept DIR")
        copied = copy_kept(workdir / study_output(args.kept_study, args), args.kept, KEPT_FILES)
        print(f"kept {copied} file(s) in {args.kept}")
        return 0
    output = workdir / study_output(args.study, args) if args.study in ("cv", "finetune", "route") else None
    if args.kept is not None and output is not None:
        print(f"restored {copy_kept(args.kept, output, KEPT_SCORES)} kept score file(s) into {output}")
    prepare(recipe, workdir, args.data, args.patch_size)
    for command in study_commands(recipe, args.study, workdir, args):
        print("$ " + " ".join(command), flush=True)
        finished = subprocess.run(command, env=nnunet_env(workdir)).returncode == 0
        if args.kept is not None and output is not None:
            copy_kept(output, args.kept, KEPT_FILES)
        if not finished:
            return 1
    if args.study == "curves":
        (workdir / "curves" / "results.md").write_text(curves_table(workdir, args.curve_epochs))
        print(f"wrote {workdir / 'curves' / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
