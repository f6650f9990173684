"""The pretraining comparison of Li et al. (2025) on the generated phantom, at a scale that fits a CPU.

Every backbone is frozen and probed with the same point-wise non-linear head on held-out phantom cases:

    random init        a freshly built diffusion backbone, never trained (the floor)
    restorative        nnUNetTrainerRestorePretrain (Models Genesis)
    diffusion          nnUNetTrainerDiffPretrain (T = 10)
    diffusion + BPR    nnUNetTrainerDiffPretrainBPR with T = 1, 10 (the paper's choice) and 100

The script runs the documented workflow (docs/pretraining.md) with nnU-Net's own tools: it generates a pretraining
phantom (602) and a labelled probe phantom (601), plans and preprocesses 602, moves its plans to 601 and
preprocesses 601 with them, derives the cpu_tiny preset in both, trains nnUNetTrainerBPR and the pretraining
trainers with nnU-Net's training loop (`get_trainer_from_args`, `maybe_load_checkpoint`, `run_training`, as
nnUNetv2_train runs them, but with shorter schedules), probes every backbone, predicts the test cases with
nnU-Net's predictor and reports Dice per organ-size group (big: liver, spleen, kidneys, stomach; medium: aorta,
pancreas, gallbladder; small: adrenals), as the mean over several probe seeds (head initialisation and sampled
voxels) with each seed's mean Dice beside it. The BPR and every pretraining start from the same seed.

Two ways to train the probe head, both on the probe trainer's own network (backbone + `NonLinearProbeHead`):

    --probe-with cached   (default) the frozen backbone's multi-scale features are computed once, on 32^3 tiles
                          (stride 16) of the probe training cases, for a foreground-rich sample of voxels; the
                          head is trained on them with Adam and cross-entropy. Exact for a frozen backbone except
                          that nnU-Net's data augmentation is not applied, and minutes instead of hours on a CPU.
    --probe-with trainer  the probe trainer through nnU-Net's loop with -pretrained_weights, as a user runs it
                          (Dice + CE, SGD, augmentation). On a 2-core CPU it needs thousands of iterations before
                          the head leaves the all-background solution (docs/pretraining.md, section 6).

    python experiments/pretraining_phantom.py --workdir /tmp/pretraining_experiment
    python experiments/pretraining_phantom.py --workdir /tmp/pretraining_experiment \
        --real-ct ../shared/data/totalseg_examples/example_ct.nii.gz    # also: the BPR on a real CT

With --real-ct the phantom-trained BPR also scores real CT volumes (converted with images-to-dataset, preprocessed
with the pretraining plans): its per-axis ordering there says whether what it learnt transfers to real anatomy.
The probe comparison itself is not run on real CT: the TotalSegmentator examples hold one labelled CT, so there is
no held-out labelled case to score a probe on.

Finished steps are skipped when the script is run again on the same --workdir. The table goes to stdout and, with
the per-organ figures and timings, to <workdir>/pretraining_experiment.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PRETRAIN_ID, PROBE_ID, REAL_CT_ID = 602, 601, 603
PRESET, PLANS, CONFIGURATION = "cpu_tiny", "nnUNetPlansCPU", "3d_cpu"
SIZE_GROUPS = ("big", "medium", "small")
TILE, TILE_STRIDE = 32, 16  # cached probing: the preset's patch size, tiles overlapping by half as in inference


@dataclass(frozen=True)
class Backbone:
    label: str
    pretraining_trainer: str | None  # None: random init, never trained
    probe_trainer: str
    timesteps: int | None


BACKBONES = (
    Backbone("random init", None, "nnUNetTrainerProbeNonLinear", None),
    Backbone("restorative", "nnUNetTrainerRestorePretrain", "nnUNetTrainerProbeNonLinearRestore", None),
    Backbone("diffusion", "nnUNetTrainerDiffPretrain", "nnUNetTrainerProbeNonLinear", 10),
    Backbone("diffusion + BPR", "nnUNetTrainerDiffPretrainBPR_T1", "nnUNetTrainerProbeNonLinearBPR", 1),
    Backbone("diffusion + BPR", "nnUNetTrainerDiffPretrainBPR", "nnUNetTrainerProbeNonLinearBPR", 10),
    Backbone("diffusion + BPR", "nnUNetTrainerDiffPretrainBPR_T100", "nnUNetTrainerProbeNonLinearBPR", 100),
)


def preprocess_with_pretraining_plans(dataset_id: int, log: Path) -> None:
    """Plan a dataset only for its fingerprint, give it the pretraining plans and preprocess it with them, then
    derive the preset: docs/pretraining.md, section 4, for a probe (or any target) dataset."""
    from nnunet_diffusion.demo import run_logged
    from nnunet_diffusion.plans import write_preset_plans

    env = dict(os.environ)
    run_logged(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "--no_pp"], env, log)
    run_logged(["nnUNetv2_move_plans_between_datasets", "-s", str(PRETRAIN_ID), "-t", str(dataset_id),
                "-sp", "nnUNetPlans", "-tp", "nnUNetPlans"], env, log)
    run_logged(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", "nnUNetPlans", "-c", "3d_fullres",
                "-np", "2"], env, log)
    write_preset_plans(preprocessed_folder(dataset_id), PRESET)


def preprocessed_folder(dataset_id: int) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    return Path(os.environ["nnUNet_preprocessed"]) / maybe_convert_to_dataset_name(dataset_id)


def prepare_datasets(workdir: Path, args: argparse.Namespace) -> None:
    """Both phantoms, planned and preprocessed with one set of plans, as docs/pretraining.md describes."""
    from nnunet_diffusion.datasets.phantom import generate_phantom_dataset
    from nnunet_diffusion.demo import run_logged
    from nnunet_diffusion.plans import plan_and_preprocess_with_preset

    raw, preprocessed = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
    log = workdir / "preprocessing.log"
    if not (preprocessed / f"Dataset{PRETRAIN_ID}_PhantomPretrain" / f"{PLANS}.json").is_file():
        generate_phantom_dataset(raw, PRETRAIN_ID, "PhantomPretrain", args.pretrain_cases, 0, seed=1, overwrite=True)
        plan_and_preprocess_with_preset(PRETRAIN_ID, PRESET, preprocessed,
                                        lambda command: run_logged(command, dict(os.environ), log))
    if not (preprocessed / f"Dataset{PROBE_ID}_Phantom" / f"{PLANS}.json").is_file():
        generate_phantom_dataset(raw, PROBE_ID, "Phantom", args.probe_cases, args.test_cases, seed=0, overwrite=True)
        preprocess_with_pretraining_plans(PROBE_ID, log)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(dataset_id: int, trainer_name: str, iterations: int, args: argparse.Namespace,
          pretrained_weights: Path | None = None, final_validation: bool = False, seed: int | None = None) -> Path:
    """nnUNetv2_train's sequence for fold 0, `iterations` split into epochs of --iterations-per-epoch; returns the
    fold folder. Skipped when its checkpoint_final.pth exists. nnU-Net's final validation only on request: the
    probes are scored on the test cases instead, and mirrored sliding windows over the validation cases cost
    more CPU time than a short training."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_diffusion.runs import TrainingBudget, train_model
    from nnunet_diffusion.utils import model_folder

    fold_folder = model_folder(os.environ["nnUNet_results"], maybe_convert_to_dataset_name(dataset_id), trainer_name,
                               PLANS, CONFIGURATION) / "fold_0"
    if (fold_folder / "checkpoint_final.pth").is_file():
        return fold_folder
    per_epoch = min(iterations, args.iterations_per_epoch)
    budget = TrainingBudget(max(1, round(iterations / args.iterations_per_epoch)), per_epoch, max(1, per_epoch // 10))
    train_model(str(dataset_id), CONFIGURATION, 0, trainer_name, PLANS, budget, args.device,
                args.seed if seed is None else seed, final_validation, pretrained_weights)
    return fold_folder


def random_init_checkpoint(workdir: Path, trainer_name: str) -> Path:
    """A pretraining network exactly as its trainer builds it, never trained: the probes' floor."""
    from nnunetv2.run.run_training import get_trainer_from_args

    path = workdir / "random_init_checkpoint.pth"
    if not path.is_file():
        seed_everything(0)
        trainer = get_trainer_from_args(str(PRETRAIN_ID), CONFIGURATION, 0, trainer_name, PLANS,
                                        device=torch.device("cpu"))
        trainer.initialize()
        torch.save({"network_weights": trainer.network.state_dict(), "trainer_name": trainer_name}, path)
    return path


def predict(model_folder: Path, output: Path, device: str) -> None:
    """nnU-Net's predictor (what nnUNetv2_predict runs), fold 0, without test-time mirroring to save time."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device(device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (0,), "checkpoint_final.pth")
    predict_test_cases(predictor, output)


def predict_test_cases(predictor, output: Path) -> None:
    images = Path(os.environ["nnUNet_raw"]) / f"Dataset{PROBE_ID}_Phantom" / "imagesTs"
    predictor.predict_from_files(str(images), str(output), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


def dice_by_organ(predictions: Path) -> dict[str, float]:
    from nnunet_diffusion.datasets.phantom import LABELS
    from nnunet_diffusion.evaluation.metrics import evaluate_folder

    references = Path(os.environ["nnUNet_raw"]) / f"Dataset{PROBE_ID}_Phantom" / "labelsTs"
    organs = {name: label for name, label in LABELS.items() if label}
    means = evaluate_folder(predictions, references, list(organs.values()))["mean"]
    return {name: means[str(label)]["Dice"] for name, label in organs.items()}


def summarise(dice: dict[str, float]) -> dict[str, float]:
    from nnunet_diffusion.datasets.phantom import ORGAN_SIZE_GROUPS

    summary = {"mean": float(np.mean(list(dice.values())))}
    for group in SIZE_GROUPS:
        summary[group] = float(np.mean([d for organ, d in dice.items() if ORGAN_SIZE_GROUPS[organ] == group]))
    return summary


def probe_plans() -> tuple:
    """Plans manager, configuration manager and dataset.json of the preprocessed probe dataset."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = preprocessed_folder(PROBE_ID)
    plans_manager = PlansManager(str(folder / f"{PLANS}.json"))
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return plans_manager, plans_manager.get_configuration(CONFIGURATION), dataset_json


def probe_network(backbone: Backbone, weights: Path, plans: tuple, seed: int) -> torch.nn.Module:
    """The probe trainer's network as nnUNetv2_train builds it, the backbone copied in by nnU-Net's
    `load_pretrained_weights` (what -pretrained_weights does); the head is freshly initialised from `seed`."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunet_diffusion.trainers import probes

    plans_manager, configuration, dataset_json = plans
    seed_everything(seed)
    network = getattr(probes, backbone.probe_trainer).build_network_architecture(
        plans_manager, configuration, len(dataset_json["channel_names"]),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, False)
    load_pretrained_weights(network, str(weights))
    return network


def probe_cases(data_identifier: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, labels) of every preprocessed probe case, loaded one at a time; voxels outside nnU-Net's crop mask
    (−1) count as background."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data_folder = preprocessed_folder(PROBE_ID) / data_identifier
    dataset = infer_dataset_class(str(data_folder))(str(data_folder))
    for key in dataset.identifiers:
        data, seg, _, _ = dataset.load_case(key)
        yield torch.from_numpy(np.asarray(data)).float(), torch.from_numpy(np.asarray(seg)[0]).long().clamp_(min=0)


def probe_cached(backbone: Backbone, weights: Path, output: Path, seed: int, args: argparse.Namespace) -> dict:
    """--probe-with cached: features once, head trained on them, test cases predicted by nnU-Net's predictor.
    `seed` sets the head's initialisation, the cached voxels and the order of the batches."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_diffusion.pretraining.cached_probing import cached_features, train_head_on_cached

    plans_manager, configuration, dataset_json = plans = probe_plans()
    network = probe_network(backbone, weights, plans, seed)
    features, labels = cached_features(network, probe_cases(configuration.data_identifier), TILE, TILE_STRIDE,
                                       args.voxels_per_tile, seed)
    losses = train_head_on_cached(network, features, labels, args.probe_iterations, args.probe_lr,
                                  args.probe_batch_voxels, seed)
    network.eval()
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device(args.device), allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()], dataset_json,
                                    backbone.probe_trainer, None)
    predict_test_cases(predictor, output)
    return {"cached_voxels": len(labels), "head_loss_first_last_100": [float(np.mean(losses[:100])),
                                                                       float(np.mean(losses[-100:]))]}


def probe_with_trainer(backbone: Backbone, weights: Path, output: Path, seed: int, args: argparse.Namespace
                       ) -> dict:
    """--probe-with trainer: the probe trainer in nnU-Net's loop with -pretrained_weights, then its model folder."""
    fold_folder = train(PROBE_ID, backbone.probe_trainer, args.probe_iterations, args, pretrained_weights=weights,
                        seed=seed)
    predict(fold_folder.parent, output, args.device)
    shutil.move(str(fold_folder.parent), output.parent / f"model_seed{seed}")  # probes of a class share a folder
    return {}


def pretrained_weights(workdir: Path, backbone: Backbone, args: argparse.Namespace) -> Path:
    """The backbone's pretraining checkpoint (trained here unless it exists); random init: a fresh network."""
    if backbone.pretraining_trainer is None:
        return random_init_checkpoint(workdir, "nnUNetTrainerDiffPretrain")
    print(f"pretraining {backbone.pretraining_trainer}", flush=True)
    return train(PRETRAIN_ID, backbone.pretraining_trainer, args.pretrain_iterations, args) / "checkpoint_final.pth"


def probe_backbone(workdir: Path, backbone: Backbone, bpr_checkpoint: Path, args: argparse.Namespace) -> dict:
    """Pretrain (unless random init), probe the frozen backbone once per probe seed, predict and score; one row
    with the means over the seeds and the spread of the mean Dice."""
    from nnunet_diffusion.pretraining.bpr_guidance import BPR_CHECKPOINT_VARIABLE

    os.environ[BPR_CHECKPOINT_VARIABLE] = str(bpr_checkpoint)
    key = backbone.pretraining_trainer or "random_init"
    kept = workdir / f"probes_{args.probe_with}" / key
    kept.mkdir(parents=True, exist_ok=True)
    weights, per_seed = None, []
    for seed in args.probe_seeds:
        predictions, record = kept / f"predictions_seed{seed}", kept / f"probing_seed{seed}.json"
        if not predictions.is_dir():
            if weights is None:
                weights = pretrained_weights(workdir, backbone, args)
            print(f"probing {key} with {backbone.probe_trainer} ({args.probe_with}, seed {seed})", flush=True)
            started, unfinished = time.time(), kept / "predictions_tmp"
            shutil.rmtree(unfinished, ignore_errors=True)
            probing = PROBE_MODES[args.probe_with](backbone, weights, unfinished, seed, args)
            record.write_text(json.dumps({**probing, "seconds": round(time.time() - started)}))
            shutil.move(str(unfinished), predictions)
        dice = dice_by_organ(predictions)
        per_seed.append({"seed": seed, **summarise(dice), "dice_per_organ": dice,
                         "probing": json.loads(record.read_text())})
    organs = per_seed[0]["dice_per_organ"]
    means = {name: float(np.mean([run[name] for run in per_seed])) for name in ("mean", *SIZE_GROUPS)}
    return {"backbone": backbone.label, "T": backbone.timesteps, "pretraining": key, "probe": backbone.probe_trainer,
            **means, "mean_per_seed": [run["mean"] for run in per_seed],
            "dice_per_organ": {organ: float(np.mean([run["dice_per_organ"][organ] for run in per_seed]))
                               for organ in organs}, "per_seed": per_seed}


def bpr_ordering(fold_folder: Path) -> dict[str, float]:
    """Mean validation Spearman per axis, from the bpr_validation.json that nnUNetTrainerBPR writes."""
    validation = json.loads((fold_folder / "bpr_validation.json").read_text())
    return validation["mean_per_axis"]


def real_ct_ordering(workdir: Path, ct_files: list[Path], bpr_checkpoint: Path) -> dict[str, dict[str, float]]:
    """Per-axis Spearman of the phantom-trained BPR on real CT volumes preprocessed with the pretraining plans."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_diffusion.bpr.model import load_bpr_from_nnunet_checkpoint
    from nnunet_diffusion.bpr.coordinates import ordering_spearman
    from nnunet_diffusion.datasets.unlabeled import images_to_dataset

    folder = Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{REAL_CT_ID}_RealCT"
    if not (folder / f"{PLANS}.json").is_file():
        images = workdir / "real_ct_images"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir()
        for file in ct_files:
            shutil.copy(file, images / file.name)
        images_to_dataset(images, os.environ["nnUNet_raw"], REAL_CT_ID, "RealCT", overwrite=True)
        preprocess_with_pretraining_plans(REAL_CT_ID, workdir / "preprocessing.log")
    configuration = PlansManager(str(folder / f"{PLANS}.json")).get_configuration(CONFIGURATION)
    data_folder = folder / configuration.data_identifier
    dataset = infer_dataset_class(str(data_folder))(str(data_folder))
    model = load_bpr_from_nnunet_checkpoint(bpr_checkpoint).eval()
    return {key: ordering_spearman(model, np.asarray(dataset.load_case(key)[0][0]), configuration.spacing)
            for key in dataset.identifiers}


def markdown(rows: list[dict]) -> str:
    lines = ["| backbone (frozen) | T | probe | mean Dice | big | medium | small | mean Dice per probe seed |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = " / ".join(f"{dice:.3f}" for dice in row["mean_per_seed"])
        lines.append(f"| {row['backbone']} | {row['T'] or '—'} | {row['probe']} | {row['mean']:.3f} | "
                     f"{row['big']:.3f} | {row['medium']:.3f} | {row['small']:.3f} | {seeds} |")
    return "\n".join(lines)


PROBE_MODES = {"cached": probe_cached, "trainer": probe_with_trainer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="nnU-Net folders and results go here")
    parser.add_argument("--pretrain-cases", type=int, default=24, help="unlabelled phantom cases for pretraining")
    parser.add_argument("--probe-cases", type=int, default=10, help="labelled phantom cases for the probes")
    parser.add_argument("--test-cases", type=int, default=4, help="held-out labelled cases")
    parser.add_argument("--bpr-iterations", type=int, default=600)
    parser.add_argument("--pretrain-iterations", type=int, default=1000)
    parser.add_argument("--probe-with", choices=tuple(PROBE_MODES), default="cached",
                        help="train the probe head on cached frozen features or with the probe trainer")
    parser.add_argument("--probe-iterations", type=int, default=3000,
                        help="head training steps (cached) or nnU-Net training iterations (trainer)")
    parser.add_argument("--probe-lr", type=float, default=3e-3, help="Adam learning rate (cached probing)")
    parser.add_argument("--probe-batch-voxels", type=int, default=8192, help="voxels per step (cached probing)")
    parser.add_argument("--voxels-per-tile", type=int, default=2048, help="voxels cached per tile (cached probing)")
    parser.add_argument("--iterations-per-epoch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the BPR and every pretraining start from this seed")
    parser.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1],
                        help="each backbone is probed once per seed; the table gives the means and each seed's")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--real-ct", type=Path, nargs="*", default=[],
                        help="real CT files (.nii.gz) on which to measure the phantom-trained BPR's ordering")
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(workdir / name)  # before nnunetv2 is imported: it reads them once
    from nnunet_diffusion.environment import with_plugin_environment
    os.environ.update(with_plugin_environment())
    os.environ.setdefault("nnUNet_def_n_proc", "2")

    started = time.time()
    prepare_datasets(workdir, args)
    print("training nnUNetTrainerBPR", flush=True)
    bpr_folder = train(PRETRAIN_ID, "nnUNetTrainerBPR", args.bpr_iterations, args, final_validation=True)
    rows = [probe_backbone(workdir, backbone, bpr_folder / "checkpoint_final.pth", args) for backbone in BACKBONES]
    ordering = bpr_ordering(bpr_folder)
    real_ct = real_ct_ordering(workdir, args.real_ct, bpr_folder / "checkpoint_final.pth") if args.real_ct else {}
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "bpr_spearman_per_axis": ordering,
              "bpr_spearman_per_axis_real_ct": real_ct, "rows": rows, "total_seconds": round(time.time() - started)}
    (workdir / "pretraining_experiment.json").write_text(json.dumps(result, indent=2))
    print(f"\nBPR ordering of the pretraining phantom's validation cases (Spearman per axis): {ordering}")
    for case, per_axis in real_ct.items():
        print(f"BPR ordering of the real CT {case} (Spearman per axis): {per_axis}")
    print(f"{args.test_cases} held-out phantom cases, {args.probe_cases} probe training cases, "
          f"{args.pretrain_iterations} pretraining / {args.probe_iterations} probe iterations; "
          f"{result['total_seconds'] / 60:.0f} min in this run (finished steps are skipped)\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
