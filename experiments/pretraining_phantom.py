"""The pretraining comparison of Li et al. (2025) at a scale that fits a CPU: frozen backbones probed with the same
point-wise non-linear head, on the generated phantom (with anatomical coordinates) and on real MR (without).

    python experiments/pretraining_phantom.py phantom --workdir /work/runs/pretraining
    python experiments/pretraining_phantom.py hippocampus --workdir /work/runs/pretraining_mr

`phantom`: the documented workflow (docs/pretraining.md) with nnU-Net's own tools and the plugin's commands
(`nnunet_diffusion.datasets.pretraining_study.prepare_phantom`). A pretraining phantom (602) and a labelled probe
phantom (601) are generated and planned; nnUNetTrainerBPR is trained on 602; `add-coordinates` writes both with
the BPR's coordinate channels (612, 611) and the probe phantom with its true coordinates from the image geometry
(621); 612's plans are moved to 611 and 621 and 602's to 601; the cpu_tiny preset is derived in all. Arms (each
frozen and probed):

    random init / + coordinates            a freshly built backbone, never trained
    restorative / + coordinates            nnUNetTrainerRestorePretrain(Coord)
    diffusion ε and x0 / + coordinates     nnUNetTrainerDiffPretrain(X0), nnUNetTrainerDiffPretrainCoord(X0), T = 10
    the T sweep                            the diffusion + coordinates arm of --sweep-prediction at T = 1, 3, 30,
                                           100, 1000

with --pretrain-seeds for the main arms (one for the sweep) and --probe-seeds per backbone, and three references:
a voxel MLP (the probe head) on the intensity alone (the floor), on the intensity plus the BPR's coordinates (what
the coordinates alone give a probe) and on the intensity plus the true coordinates (the ceiling). Dice on the
held-out phantoms, overall and per organ-size group (big: liver, spleen, kidneys, stomach; medium: aorta,
pancreas, gallbladder; small: adrenals), as the paper's Figure 2. The BPR's coordinates
are also compared with the true positions (per held-out phantom: slope and intercept per axis, pooled R², next to
the Spearman) and, with --real-ct, read at the organ centroids of the TotalSegmentator example CT.

`hippocampus`: the frozen-probe comparison without coordinates on the 200 real MR cases of
../shared/data/msd_hippocampus: random init, restorative, diffusion ε and x0 at T = 10, pretrained on all 200
images (labels ignored), probed on --probe-cases labelled cases, scored on the rest.

Probes are trained on cached frozen features (`nnunet_diffusion.pretraining.dataset_probing`): the backbone runs
once per backbone on overlapping tiles of the probe cases, and each probe seed trains the head on a sample of
those voxels (half foreground) with Adam and cross-entropy; the probe network then predicts the held-out cases
through nnU-Net's predictor (no mirroring). Finished steps are skipped when the script runs again on the same
--workdir; results.json and results.md are rewritten after every probe (and copied to --results-dir). Where the
--workdir is gone (a run that spans sessions), the rows of --results-dir's results.json written with the same
settings are kept and only the missing ones are pretrained and probed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_diffusion.bpr.agreement import coordinate_agreement, real_ct_organs
from nnunet_diffusion.datasets.pretraining_study import (PhantomStudyDatasets, StudyDataset, StudyFolders,
                                                         prepare_hippocampus, prepare_phantom)
from nnunet_diffusion.pretraining.dataset_probing import (HeadTraining, ProbeDataset, VoxelMLP,
                                                          cached_dataset_features, num_classes, predict_test_cases,
                                                          probe_network, seed_everything, train_head)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PRESET, PLANS, CONFIGURATION = "cpu_tiny", "nnUNetPlansCPU", "3d_cpu"
SIZE_GROUPS = ("big", "medium", "small")

PRETRAIN, PRETRAIN_COORD = StudyDataset(602, "PhantomPretrain"), StudyDataset(612, "PhantomPretrainCoord")
PROBE, PROBE_COORD = StudyDataset(601, "Phantom"), StudyDataset(611, "PhantomCoord")
PROBE_TRUE = StudyDataset(621, "PhantomTrueCoord")
PHANTOM = PhantomStudyDatasets(PRETRAIN, PRETRAIN_COORD, PROBE, PROBE_COORD, PROBE_TRUE)
HIPPOCAMPUS, HIPPOCAMPUS_PROBE = StudyDataset(631, "HippocampusImages"), StudyDataset(632, "HippocampusProbe")


@dataclass(frozen=True)
class Arm:
    label: str
    pretraining_trainer: str | None  # None: random init, never trained
    probe_trainer: str
    pretraining_dataset: StudyDataset
    probe_dataset: StudyDataset
    timesteps: int | None = None
    main: bool = True  # main arms get every pretraining seed, the T sweep the first


def phantom_arms(sweep_prediction: str) -> list[Arm]:
    arms = [Arm("random init", None, "nnUNetTrainerProbeNonLinear", PRETRAIN, PROBE),
            Arm("random init + coordinates", None, "nnUNetTrainerProbeNonLinearCoord", PRETRAIN_COORD, PROBE_COORD),
            Arm("restorative", "nnUNetTrainerRestorePretrain", "nnUNetTrainerProbeNonLinearRestore", PRETRAIN, PROBE),
            Arm("restorative + coordinates", "nnUNetTrainerRestorePretrainCoord",
                "nnUNetTrainerProbeNonLinearRestoreCoord", PRETRAIN_COORD, PROBE_COORD)]
    for prediction, suffix in (("ε", ""), ("x0", "X0")):
        arms += [Arm(f"diffusion {prediction}", f"nnUNetTrainerDiffPretrain{suffix}", "nnUNetTrainerProbeNonLinear",
                     PRETRAIN, PROBE, 10),
                 Arm(f"diffusion {prediction} + coordinates", f"nnUNetTrainerDiffPretrainCoord{suffix}",
                     "nnUNetTrainerProbeNonLinearCoord", PRETRAIN_COORD, PROBE_COORD, 10)]
    suffix = "X0" if sweep_prediction == "x0" else ""
    arms += [Arm(f"diffusion {'x0' if suffix else 'ε'} + coordinates", f"nnUNetTrainerDiffPretrainCoord{suffix}_T{t}",
                 "nnUNetTrainerProbeNonLinearCoord", PRETRAIN_COORD, PROBE_COORD, t, main=False)
             for t in (1, 3, 30, 100, 1000)]
    return arms


def hippocampus_arms() -> list[Arm]:
    return [Arm("random init", None, "nnUNetTrainerProbeNonLinear", HIPPOCAMPUS, HIPPOCAMPUS_PROBE),
            Arm("restorative", "nnUNetTrainerRestorePretrain", "nnUNetTrainerProbeNonLinearRestore", HIPPOCAMPUS,
                HIPPOCAMPUS_PROBE),
            Arm("diffusion ε", "nnUNetTrainerDiffPretrain", "nnUNetTrainerProbeNonLinear", HIPPOCAMPUS,
                HIPPOCAMPUS_PROBE, 10),
            Arm("diffusion x0", "nnUNetTrainerDiffPretrainX0", "nnUNetTrainerProbeNonLinear", HIPPOCAMPUS,
                HIPPOCAMPUS_PROBE, 10)]


# --- datasets ---------------------------------------------------------------------------------------------------

def raw(dataset: StudyDataset) -> Path:
    return Path(os.environ["nnUNet_raw"]) / dataset.folder


def probe_dataset(dataset: StudyDataset) -> ProbeDataset:
    return ProbeDataset(raw(dataset), Path(os.environ["nnUNet_preprocessed"]) / dataset.folder, PLANS, CONFIGURATION)


def study_folders(workdir: Path) -> StudyFolders:
    """The workdir's nnU-Net folders; nnU-Net's commands log to preprocessing.log."""
    from nnunet_diffusion.demo import run_logged
    return StudyFolders(Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"]),
                        lambda command: run_logged(command, dict(os.environ), workdir / "preprocessing.log"), PRESET)


# --- training and probing -----------------------------------------------------------------------------------------

def results_of(seed: int) -> Path:
    """Every pretraining seed trains into its own nnUNet_results (seed 0 into the workdir's)."""
    base = Path(os.environ["nnUNet_results"])
    return base if seed == 0 else base / f"seed_{seed}"


def train(dataset: StudyDataset, trainer_name: str, iterations: int, args: argparse.Namespace, seed: int = 0,
          final_validation: bool = False) -> Path:
    """Fold 0 trained by the plugin's runner (`python -m nnunet_diffusion.training`, in a fresh process with the
    seed's nnUNet_results; with nnU-Net's final validation where wanted, for the BPR's bpr_validation.json),
    `iterations` in epochs of --iterations-per-epoch; returns the fold folder (the runner skips a finished one
    and resumes an interrupted one)."""
    from nnunet_diffusion.training import TrainingRun, run_arguments
    from nnunet_diffusion.utils import TrainingBudget

    per_epoch = min(iterations, args.iterations_per_epoch)
    budget = TrainingBudget(max(1, round(iterations / per_epoch)), per_epoch, max(1, per_epoch // 10))
    run = TrainingRun(str(dataset.dataset_id), CONFIGURATION, 0, trainer_name, PLANS, budget, seed, args.device,
                      results=str(results_of(seed)), validate=final_validation)
    log = Path(os.environ["nnUNet_results"]).parent / "logs" / f"{trainer_name}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        subprocess.run([sys.executable, "-m", "nnunet_diffusion.training", *run_arguments(run)],
                       env={**os.environ, "nnUNet_results": str(results_of(seed))}, stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    return run.fold_folder


def train_bpr(dataset: StudyDataset, args: argparse.Namespace) -> Path:
    print("training nnUNetTrainerBPR", flush=True)
    return train(dataset, "nnUNetTrainerBPR", args.bpr_iterations, args, final_validation=True) / \
        "checkpoint_final.pth"


def probe_trainer(name: str) -> type:
    from nnunet_diffusion.trainers import probes
    return getattr(probes, name)


def backbone_checkpoint(workdir: Path, arm: Arm, seed: int, args: argparse.Namespace) -> Path:
    """The arm's pretraining checkpoint for a seed, trained unless it exists; random init: a freshly built
    pretraining network of the probe's backbone, saved as a checkpoint."""
    from nnunetv2.run.run_training import get_trainer_from_args
    if arm.pretraining_trainer is not None:
        print(f"pretraining {arm.pretraining_trainer} (seed {seed})", flush=True)
        return train(arm.pretraining_dataset, arm.pretraining_trainer, args.pretrain_iterations, args, seed) / \
            "checkpoint_final.pth"
    pretraining_trainer = probe_trainer(arm.probe_trainer).backbone.pretraining_trainer
    path = workdir / "random_init" / f"{pretraining_trainer}_seed{seed}.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        seed_everything(seed)
        trainer = get_trainer_from_args(str(arm.pretraining_dataset.dataset_id), CONFIGURATION, 0,
                                        pretraining_trainer, PLANS, device=torch.device("cpu"))
        trainer.initialize()
        torch.save({"network_weights": trainer.network.state_dict(), "trainer_name": pretraining_trainer}, path)
    return path


def head_training(args: argparse.Namespace) -> HeadTraining:
    return HeadTraining(args.voxels_per_tile, args.probe_iterations, args.probe_lr, args.probe_batch_voxels)


def dice_by_label(predictions: Path, dataset: StudyDataset) -> dict[str, float]:
    from nnunet_diffusion.evaluation.metrics import evaluate_folder
    labels = {name: value for name, value in json.loads((raw(dataset) / "dataset.json").read_text())["labels"].items()
              if value}
    means = evaluate_folder(predictions, raw(dataset) / "labelsTs", list(labels.values()))["mean"]
    return {name: means[str(value)]["Dice"] for name, value in labels.items()}

def scored(kept: Path, seed: int, run) -> dict:
    """One probe seed: its predictions and record are kept, so a rerun scores them again without probing."""
    predictions, record = kept / f"predictions_seed{seed}", kept / f"probing_seed{seed}.json"
    if not predictions.is_dir():
        started, unfinished = time.time(), kept / "predictions_tmp"
        shutil.rmtree(unfinished, ignore_errors=True)
        details = run(unfinished)
        record.write_text(json.dumps({**details, "seconds": round(time.time() - started)}))
        shutil.move(str(unfinished), predictions)
    return {"predictions": predictions, **json.loads(record.read_text())}


ROW_SETTINGS = ("dataset", "pretrain_cases", "probe_cases", "test_cases", "bpr_iterations", "pretrain_iterations",
                "iterations_per_epoch", "probe_iterations", "probe_lr", "probe_batch_voxels", "voxels_per_tile")


def row_key(row: dict) -> tuple:
    return row["arm"], row["T"], row["pretrain_seed"], row["probe_seed"]


def kept_rows(args: argparse.Namespace) -> dict[tuple, dict]:
    """The rows of --results-dir's results.json when it was written with the same settings, by row_key: a run whose
    --workdir is gone (it spans sessions) resumes from them instead of pretraining and probing again."""
    file = args.results_dir / "results.json" if args.results_dir else None
    if file is None or not file.is_file():
        return {}
    earlier = json.loads(file.read_text())
    differing = [k for k in ROW_SETTINGS if earlier["settings"].get(k) != str(getattr(args, k))]
    if differing:
        print(f"{file}: written with other --{', --'.join(differing).replace('_', '-')}; its rows are not reused",
              flush=True)
        return {}
    return {row_key(row): row for row in earlier["runs"]}


def rows_of_probe_seeds(make_row, label: str, timesteps: int | None, pretrain_seed: int | None,
                        args: argparse.Namespace, kept: dict[tuple, dict]) -> list[dict]:
    """One row per probe seed: kept (see kept_rows) or made by `make_row(seed)`."""
    return [kept.get((label, timesteps, pretrain_seed, seed)) or make_row(seed) for seed in args.probe_seeds]


def probe_arm(workdir: Path, arm: Arm, pretrain_seed: int, args: argparse.Namespace,
              earlier_rows: dict[tuple, dict]) -> list[dict]:
    """Pretrain (unless random init), cache the frozen features once, train the head once per probe seed,
    predict and score; one row per probe seed."""
    from nnunet_diffusion.pretraining.cached_probing import decoder_features_of
    from nnunet_diffusion.pretraining.network import decoder_level_channels
    kept = workdir / "probes" / arm.probe_dataset.folder / f"{arm.pretraining_trainer or arm.label}_seed{pretrain_seed}"
    kept.mkdir(parents=True, exist_ok=True)
    dataset, trainer = probe_dataset(arm.probe_dataset), probe_trainer(arm.probe_trainer)
    cache: dict = {}

    def run(seed: int):
        def probe(output: Path) -> dict:
            if "features" not in cache:
                cache["weights"] = backbone_checkpoint(workdir, arm, pretrain_seed, args)
                print(f"caching features: {arm.label} (T {arm.timesteps}, seed {pretrain_seed})", flush=True)
                cache["features"] = cached_dataset_features(
                    decoder_features_of(probe_network(trainer, dataset, cache["weights"], 0)), dataset,
                    head_training(args))
            network = probe_network(trainer, dataset, cache["weights"], seed)
            losses = train_head(network.head, decoder_level_channels(network.unet), cache["features"], seed,
                                head_training(args))
            predict_test_cases(network.eval(), dataset, arm.probe_trainer, output, args.device)
            return {"cached_voxels": len(cache["features"][1]), "head_loss_first_last_100":
                    [float(np.mean(losses[:100])), float(np.mean(losses[-100:]))]}
        return probe
    return rows_of_probe_seeds(
        lambda seed: {"arm": arm.label, "T": arm.timesteps, "pretraining": arm.pretraining_trainer,
                      "probe": arm.probe_trainer, "pretrain_seed": pretrain_seed, "probe_seed": seed,
                      "dice": dice_by_label(scored(kept, seed, run(seed))["predictions"], arm.probe_dataset)},
        arm.label, arm.timesteps, pretrain_seed, args, earlier_rows)


def reference(workdir: Path, label: str, study_dataset: StudyDataset, channels: int, args: argparse.Namespace,
              earlier_rows: dict[tuple, dict]) -> list[dict]:
    """The probe head on the first `channels` input channels (intensity; intensity + true coordinates)."""
    dataset = probe_dataset(study_dataset)
    kept = workdir / "probes" / study_dataset.folder / f"reference_{channels}_channels"
    kept.mkdir(parents=True, exist_ok=True)
    cache: dict = {}

    def run(seed: int):
        def probe(output: Path) -> dict:
            if "features" not in cache:
                cache["features"] = cached_dataset_features(lambda tile: tile[0, :channels], dataset,
                                                            head_training(args))
            seed_everything(seed)
            network = VoxelMLP(channels, num_classes(dataset))
            train_head(network.head, [channels], cache["features"], seed, head_training(args))
            predict_test_cases(network.eval(), dataset, "reference", output, args.device)
            return {}
        return probe
    return rows_of_probe_seeds(
        lambda seed: {"arm": label, "T": None, "pretraining": None, "probe": "voxel MLP", "pretrain_seed": None,
                      "probe_seed": seed,
                      "dice": dice_by_label(scored(kept, seed, run(seed))["predictions"], study_dataset)},
        label, None, None, args, earlier_rows)


# --- tables ---------------------------------------------------------------------------------------------------------

def organ_groups(dataset: StudyDataset) -> dict[str, str]:
    return json.loads((raw(dataset) / "dataset.json").read_text()).get("organ_size_groups", {})


def summary_rows(rows: list[dict], groups: dict[str, str]) -> list[dict]:
    """Per arm and T: mean ± sd over every (pretraining seed, probe seed), the sd between pretraining seeds (of
    their means over probe seeds) and between probe seeds (within a pretraining seed, averaged), per size group."""
    table = []
    for key in dict.fromkeys((r["arm"], r["T"]) for r in rows):
        runs = [r for r in rows if (r["arm"], r["T"]) == key]
        means = np.array([np.mean(list(r["dice"].values())) for r in runs])
        by_pretraining = {}
        for r, m in zip(runs, means):
            by_pretraining.setdefault(r["pretrain_seed"], []).append(m)
        entry = {"arm": key[0], "T": key[1], "pretraining_seeds": len(by_pretraining), "probe_seeds":
                 len(runs) // len(by_pretraining), "mean": float(means.mean()),
                 "sd": float(means.std(ddof=1)) if len(means) > 1 else None,
                 "sd_pretraining": float(np.std([np.mean(v) for v in by_pretraining.values()], ddof=1))
                 if len(by_pretraining) > 1 else None,
                 "sd_probe": float(np.mean([np.std(v, ddof=1) for v in by_pretraining.values() if len(v) > 1]))
                 if any(len(v) > 1 for v in by_pretraining.values()) else None,
                 "per_label": {name: float(np.mean([r["dice"][name] for r in runs])) for name in runs[0]["dice"]}}
        for group in sorted(set(groups.values()), key=SIZE_GROUPS.index):
            entry[group] = float(np.mean([v for name, v in entry["per_label"].items() if groups.get(name) == group]))
        table.append(entry)
    return table


def _f(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(table: list[dict], groups: Sequence[str], agreement: dict | None, real_ct: dict | None,
             settings: str) -> str:
    from nnunet_diffusion.utils import markdown_table
    lines = ["# Frozen-backbone probing", "", settings, "",
             markdown_table(["backbone (frozen)", "T", "pretraining seeds", "probe seeds", "mean Dice ± sd",
                             "sd pretraining", "sd probe", *groups],
                            [[r["arm"], r["T"] or "—", r["pretraining_seeds"], r["probe_seeds"],
                              f"{r['mean']:.3f} ± {_f(r['sd'])}", _f(r["sd_pretraining"]), _f(r["sd_probe"]),
                              *(_f(r.get(g)) for g in groups)] for r in table])]
    labels = list(table[0]["per_label"]) if table else []
    lines += ["", "Dice per label (mean over seeds):", "",
              markdown_table(["backbone", "T", *labels],
                             [[r["arm"], r["T"] or "—", *(_f(r["per_label"][n]) for n in labels)] for r in table])]
    if agreement:
        lines += ["", "BPR coordinates against the true positions of the probe phantoms, which the BPR never saw "
                  "(slope and intercept per case: 1 and one shared value for a perfect BPR; pooled R² of one line "
                  "over all cases, so offsets between cases count; the Spearman of the BPR's whole-slice scores "
                  "against slice order on its validation cases):", "",
                  markdown_table(["case", *(f"{a} slope / intercept" for a in agreement["pooled_r2"])],
                                 [[case, *(f"{v['slope']:.2f} / {v['intercept']:+.2f}" for v in rows.values())]
                                  for case, rows in agreement["per_case"].items()]),
                  "", markdown_table(["", *agreement["pooled_r2"]],
                                     [["pooled R²", *(f"{v:.3f}" for v in agreement["pooled_r2"].values())],
                                      ["Spearman (BPR validation)", *(_f(v) for v in agreement["spearman"].values())]])]
    if real_ct:
        lines += ["", f"The phantom-trained BPR on the TotalSegmentator example CT, at organ centroids (Spearman over "
                  f"organs {real_ct['spearman_over_organs']:.2f}):", "",
                  markdown_table(["organ", "BPR axial coordinate", "true z (mm)"],
                                 [[r["organ"], f"{r['bpr_axial']:.2f}", f"{r['true_z_mm']:.0f}"]
                                  for r in real_ct["organs"]])]
    return "\n".join(lines) + "\n"


def write_results(workdir: Path, args: argparse.Namespace, rows: list[dict], groups: dict[str, str],
                  extras: dict) -> None:
    table = summary_rows(rows, groups)
    held_out = raw(PROBE if args.dataset == "phantom" else HIPPOCAMPUS_PROBE) / "labelsTs"
    settings = (f"`python experiments/pretraining_phantom.py {args.dataset}` with pretraining "
                f"{args.pretrain_iterations} iterations, probes {args.probe_iterations} head steps on "
                f"{args.voxels_per_tile} voxels per tile, pretraining seeds {args.pretrain_seeds}, probe seeds "
                f"{args.probe_seeds}; {args.probe_cases} probe training cases, {len(list(held_out.glob('*')))} "
                f"held-out cases scored.")
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "table": table, "runs": rows, **extras}
    text = markdown(table, [g for g in SIZE_GROUPS if g in set(groups.values())], extras.get("coordinates"),
                    extras.get("real_ct"), settings)
    for folder in {workdir, args.results_dir} - {None}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(result, indent=1, default=str))
        (folder / "results.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("phantom", "hippocampus"))
    parser.add_argument("--workdir", type=Path, required=True, help="nnU-Net folders and results go here")
    parser.add_argument("--results-dir", type=Path, help="also write results.json/md here")
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--pretrain-cases", type=int, default=24, help="phantom: unlabelled pretraining cases")
    parser.add_argument("--probe-cases", type=int, default=10, help="labelled cases the probes are trained on")
    parser.add_argument("--test-cases", type=int, default=4, help="phantom: held-out labelled cases")
    parser.add_argument("--bpr-iterations", type=int, default=600)
    parser.add_argument("--pretrain-iterations", type=int, default=1000)
    parser.add_argument("--iterations-per-epoch", type=int, default=100)
    parser.add_argument("--probe-iterations", type=int, default=3000, help="head training steps")
    parser.add_argument("--probe-lr", type=float, default=3e-3, help="Adam learning rate of the head")
    parser.add_argument("--probe-batch-voxels", type=int, default=8192)
    parser.add_argument("--voxels-per-tile", type=int, default=2048)
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep-prediction", choices=("epsilon", "x0"), default="x0",
                        help="phantom: the diffusion + coordinates arm of the T sweep")
    parser.add_argument("--arms", nargs="+", help="only the arms with these labels (e.g. for a quick look)")
    parser.add_argument("--real-ct", action="store_true", help="phantom: also read the BPR at the organ centroids "
                        "of the TotalSegmentator example CT")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    kept = kept_rows(args)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(workdir / name)  # before nnunetv2 is imported: it reads them once
    from nnunet_diffusion.environment import with_plugin_environment
    os.environ.update(with_plugin_environment())
    os.environ.setdefault("nnUNet_def_n_proc", "2")

    extras: dict = {}
    if args.dataset == "phantom":
        bpr = prepare_phantom(study_folders(workdir), PHANTOM, args.pretrain_cases, args.probe_cases,
                              args.test_cases, lambda dataset: train_bpr(dataset, args))
        arms = phantom_arms(args.sweep_prediction)
        extras["coordinates"] = coordinate_agreement(raw(PROBE_COORD), raw(PROBE_TRUE),
                                                     bpr.parent / "bpr_validation.json")
        if args.real_ct:
            from nnunet_diffusion.datasets.coordinate_channels import BPRCoordinates
            examples = args.data / "totalseg_examples"
            extras["real_ct"] = real_ct_organs(examples / "example_ct.nii.gz", examples / "example_seg.nii.gz",
                                               BPRCoordinates(bpr))
        references = [("voxel MLP on intensity (floor)", PROBE, 1),
                      ("voxel MLP on intensity + BPR coordinates", PROBE_COORD, 4),
                      ("voxel MLP on intensity + true coordinates (ceiling)", PROBE_TRUE, 4)]
        groups = organ_groups(PROBE)
    else:
        prepare_hippocampus(study_folders(workdir), HIPPOCAMPUS, HIPPOCAMPUS_PROBE, args.data / "msd_hippocampus",
                            args.probe_cases)
        arms, references, groups = hippocampus_arms(), [("voxel MLP on intensity (floor)", HIPPOCAMPUS_PROBE, 1)], {}
    if args.arms:
        arms = [a for a in arms if a.label in args.arms]
    rows: list[dict] = []
    for label, dataset, channels in references:
        rows += reference(workdir, label, dataset, channels, args, kept)
        write_results(workdir, args, rows, groups, extras)
    for arm in arms:
        for seed in args.pretrain_seeds if arm.main else args.pretrain_seeds[:1]:
            rows += probe_arm(workdir, arm, seed, args, kept)
            write_results(workdir, args, rows, groups, extras)
    print((workdir / "results.md").read_text())


if __name__ == "__main__":
    main()
