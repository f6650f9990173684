"""The GPU check in one run: MSD Hippocampus at nnU-Net's default `3d_fullres` plans, on one CUDA device, in under
8 minutes, printing one Markdown table.

1. The raw dataset is linked (never copied) into a work folder as Dataset004_Hippocampus, and nnU-Net plans and
   preprocesses it (`nnUNetv2_plan_and_preprocess -c 3d_fullres`) unless that work folder holds it already.
2. Train step of the stock nnUNetTrainer, nnUNetTrainerDiff and nnUNetTrainerDiffRecycle, each built by nnU-Net
   twice (torch.compile on and off, through `nnUNet_compile`), all timed side by side on the same batches with the
   trainers' own `train_step` (nnU-Net's AMP on CUDA), with each step's peak memory.
3. Compiled vs eager diffusion network: training-mode forward at two timesteps, gradients of nnU-Net's loss, and
   seeded sampling in eval mode, in float32 (TF32 off), so that any difference is compilation, not precision.
   Its time-conditioning projections start at zero, so they are first set to random values: a timestep that
   compilation froze would otherwise go unseen.
4. Predict time per case with nnU-Net's predictor (mirroring on, as nnU-Net's default) at each model's default
   steps: stock, nnUNetTrainerDiff (all T steps) and nnUNetTrainerDiffRecycleFinetune (1 step, started from the
   stock checkpoint), each trained for a few iterations only, since time does not depend on the weights.

`--cpu-smoke` runs the same code on the CPU, small: the first 8 Hippocampus cases, one torch thread, the cpu_tiny
preset derived from nnU-Net's 3d_fullres plan, a few steps, prediction of patch-sized crops without mirroring, and
torch.compile with the aot_eager backend (nnU-Net never compiles on CPU, and inductor's C++ build takes minutes
there).

    bash bench/gpu_check.sh                       # CUDA
    bash bench/gpu_check.sh --cpu-smoke           # CPU, 1-2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from torch._dynamo import OptimizedModule

from bench_sampling import center_tile, load_network
from bench_training import (MIB, STOCK, batch_for, build_trainer, fetch_batches, memory_method, step_peak_bytes,
                            time_steps)
from benchutil import (Workspace, run_quietly, configure_device, environment_lines, paired_ratio, quiet, timed,
                       workspace)
from nnunet_diffusion.core.diffusion_network import DiffusionSegmentationNetwork
from nnunet_diffusion.core.sampling import ENV_EARLY_EXIT, ENV_SAMPLER, ENV_SEED, ENV_STEPS, SamplerSettings
from nnunet_diffusion.core.time_conditioning import FiLMNorm
from nnunet_diffusion.trainer_support import unwrap
from nnunet_diffusion.training import TrainingRun, train
from nnunet_diffusion.utils import TrainingBudget, environment, markdown_table

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"
DATASET_ID, DATASET_NAME = 4, "Hippocampus"  # MSD Task04
TRAINED = {"stock": STOCK, "Diff": "nnUNetTrainerDiff", "Recycle": "nnUNetTrainerDiffRecycle"}
PREDICTED = {"stock": STOCK, "Diff": "nnUNetTrainerDiff", "Recycle": "nnUNetTrainerDiffRecycleFinetune"}
MODES = ("eager", "compiled")
TOLERANCE = 1e-3  # max |compiled − eager| / max |eager|, float32
FILM_STD = 0.1  # random time-conditioning weights for the check
CUDA_BUDGET_SECONDS = 480
HEADER = ["check", "stock", "Diff", "Recycle", "result"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    warmup: int  # untimed rounds of all six trainers (compilation, cuDNN autotuning)
    repeats: int  # timed rounds
    batches: int  # distinct pre-fetched batches, cycled
    cases: int  # timed prediction cases, after one untimed case per model
    iterations: int  # training iterations of each predicted model
    subset: int | None  # cases of the raw dataset linked (None: all)
    whole_cases: bool  # whole cases with test-time mirroring (nnU-Net's default), else a patch-sized centre crop
    # without mirroring: one network call per sampling step, where a CPU takes seconds per mirrored case


CUDA_SIZES = Sizes(warmup=3, repeats=10, batches=2, cases=3, iterations=2, subset=None, whole_cases=True)
SMOKE_SIZES = Sizes(warmup=1, repeats=2, batches=1, cases=1, iterations=1, subset=8, whole_cases=False)


def link_cases(source: Path, target: Path, dataset_json: dict, labels: list[Path]) -> None:
    """The labelled cases as a raw nnU-Net dataset of symbolic links: the shared data are never copied."""
    ending = dataset_json["file_ending"]
    for folder in ("imagesTr", "labelsTr"):
        (target / folder).mkdir(parents=True)
    for label in labels:
        (target / "labelsTr" / label.name).symlink_to(label)
        for image in (source / "imagesTr").glob(f"{label.name[:-len(ending)]}_[0-9][0-9][0-9][0-9]{ending}"):
            (target / "imagesTr" / image.name).symlink_to(image)
    (target / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": len(labels)}, indent=1))


def prepare_dataset(source: Path, root: Path, subset: int | None) -> str:
    """Link the source's cases (or its first `subset`) and plan them under `root` (where nnUNet_raw and
    nnUNet_preprocessed must point), unless a previous run did; one with another number of cases is refused."""
    if not (source / "dataset.json").is_file():
        raise SystemExit(f"{source} is not an nnU-Net raw dataset (no dataset.json); pass --data")
    dataset_json = json.loads((source / "dataset.json").read_text())
    labels = sorted((source / "labelsTr").glob(f"*{dataset_json['file_ending']}"))[:subset]
    raw = root / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    if raw.is_dir():
        linked = json.loads((raw / "dataset.json").read_text())["numTraining"]
        if linked != len(labels):
            raise SystemExit(f"{raw} holds {linked} cases, this run wants {len(labels)}: pass another --workdir")
    else:
        link_cases(source, raw, dataset_json, labels)
    preprocessed = root / "nnUNet_preprocessed" / raw.name / "nnUNetPlans_3d_fullres"
    if len(list(preprocessed.glob("*.pkl"))) != len(labels):  # not yet, or cut off
        processes = str(min(8, multiprocessing.cpu_count()))
        run_quietly(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", processes,
                      "-npfp", processes, "--verify_dataset_integrity"])
    return raw.name


def compile_network(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile as nnU-Net applies it on CUDA; on CPU the aot_eager backend (graph capture and AOT autograd
    without code generation)."""
    return torch.compile(network) if device.type == "cuda" else torch.compile(network, backend="aot_eager")


def built_trainer(name: str, space: Workspace, device: torch.device, compiled: bool):
    """A trainer as nnU-Net builds it with nnUNet_compile on or off (nnU-Net never compiles on CPU: compiled here)."""
    with environment(nnUNet_compile="t" if compiled else "f"):
        trainer = build_trainer(name, space, device)
    if compiled and not isinstance(trainer.network, OptimizedModule):
        trainer.network = compile_network(trainer.network, device)
    return trainer


def ratio_text(times: dict[str, list[float]], suffix: str = "") -> str:
    """'Diff r [low, high], Recycle r [low, high] × stock': paired median ratios to stock, 95 % interval."""
    parts = []
    for label in ("Diff", "Recycle"):
        ratio, low, high = paired_ratio(times[label + suffix], times["stock" + suffix])
        parts.append(f"{label} {ratio:.3f} [{low:.3f}, {high:.3f}]")
    return ", ".join(parts) + " × stock"


def training_rows(space: Workspace, device: torch.device, sizes: Sizes) -> list[list[str]]:
    """Step time and peak memory of the six trainers, then the compile check on the eager Recycle trainer's loss."""
    trainers = {f"{label} {mode}": built_trainer(name, space, device, mode == "compiled")
                for mode in MODES for label, name in TRAINED.items()}
    batches = fetch_batches(trainers["stock eager"], sizes.batches, device)
    times = time_steps(trainers, batches, sizes.warmup, sizes.repeats, device)
    peaks = {key: step_peak_bytes(trainer, batches[0], device) for key, trainer in trainers.items()}
    rows = []
    for mode in MODES:
        milliseconds = [statistics.median(times[f"{label} {mode}"]) * 1e3 for label in TRAINED]
        rows.append([f"train step, {mode} (ms)", *(f"{ms:.1f}" for ms in milliseconds), ratio_text(times, f" {mode}")])
    compiled_over_eager = [paired_ratio(times[f"{label} compiled"], times[f"{label} eager"])[0] for label in TRAINED]
    rows.append(["train step, compiled / eager", *(f"{r:.3f}" for r in compiled_over_eager), ""])
    for mode in MODES:
        mib = {label: peaks[f"{label} {mode}"] / MIB for label in TRAINED}
        rows.append([f"peak memory, {mode} (MiB)", *(f"{value:.1f}" for value in mib.values()),
                     f"Diff {mib['Diff'] / mib['stock']:.3f}, Recycle {mib['Recycle'] / mib['stock']:.3f} × stock"])
    return rows + compile_rows(space, device, trainers["Recycle eager"], batches[0])


@contextlib.contextmanager
def float32_math() -> Iterator[None]:
    """No TF32 in matmuls and cuDNN convolutions (PyTorch allows it in convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_difference(compiled: list[torch.Tensor], eager: list[torch.Tensor]) -> float:
    """max |compiled − eager| over all tensors, relative to max |eager|."""
    difference = max(float((c.float() - e.float()).abs().max()) for c, e in zip(compiled, eager))
    return difference / max(float(e.float().abs().max()) for e in eager)


def compile_rows(space: Workspace, device: torch.device, trainer, batch: dict) -> list[list[str]]:
    """Compiled vs eager Recycle network, as nnU-Net's predictor builds it, with random time conditioning."""
    torch.manual_seed(0)
    network, _, _ = load_network(space, device, TRAINED["Recycle"], None)
    for module in network.modules():
        if isinstance(module, FiLMNorm):
            torch.nn.init.normal_(module.to_scale_shift.weight, std=FILM_STD)
    compiled = compile_network(network, device)
    image = batch["data"].to(device)
    target = batch_for(trainer, batch)["target"].to(device)
    x_t = torch.randn(image.shape[0], network.num_mask_channels, *image.shape[2:], device=device)
    timesteps = [torch.full((image.shape[0],), t, device=device) for t in (0, network.num_timesteps - 1)]
    parameters = [p for p in network.parameters() if p.requires_grad]

    def forward(module: torch.nn.Module) -> list[torch.Tensor]:
        network.train()
        return [module(image, x_t, t).detach() for t in timesteps]

    def gradients(module: torch.nn.Module) -> list[torch.Tensor]:
        network.train()
        loss = trainer.loss(module(image, x_t, timesteps[1]), target)
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(parameters, torch.autograd.grad(loss, parameters, allow_unused=True))]

    def sampling(module: torch.nn.Module) -> list[torch.Tensor]:
        network.eval()
        with torch.no_grad(), network.sampling_with(SamplerSettings("ddim", network.num_timesteps, seed=0)):
            return [module(image)]

    checks: list[tuple[str, Callable[[torch.nn.Module], list[torch.Tensor]]]] = [
        ("forward at t = 0 and T−1", forward), ("gradients of nnU-Net's loss", gradients),
        (f"seeded sampling, {network.num_timesteps} DDIM steps", sampling)]
    rows = []
    with float32_math():
        for what, check in checks:
            try:
                eager = check(network)
                difference = relative_difference(check(compiled), eager)
            except Exception as error:  # a failed compilation is this check's finding, not the end of the run
                message = (str(error).splitlines() or [""])[0][:200].replace("|", "/")  # a cell of the table
                rows.append([f"compiled vs eager: {what}", "", "", f"{type(error).__name__}: {message}", "FAIL"])
                continue
            measured, passed = f"max abs diff / max abs eager: {difference:.1e}", difference <= TOLERANCE
            if check is forward:  # without a timestep effect the check could not see a frozen timestep
                effect = relative_difference(eager[:1], eager[1:])
                measured += f"; t = 0 vs T−1 differ by {effect:.2f}"
                passed = passed and effect >= 10 * TOLERANCE
            rows.append([f"compiled vs eager: {what}", "", "", measured,
                         f"{'pass' if passed else 'FAIL'} (tolerance {TOLERANCE:g})"])
    return rows


def trained_model(space: Workspace, device: torch.device, trainer: str, iterations: int) -> Path:
    """A model folder of fold 'all' after a few iterations of nnU-Net's loop (uncompiled: weights do not matter)."""
    run = TrainingRun(space.dataset, space.configuration, "all", trainer, space.plans,
                      TrainingBudget(1, iterations, 1), device=device.type)
    with environment(nnUNet_compile="f"):
        train(run)
    return run.fold_folder.parent


def predict_rows(space: Workspace, device: torch.device, sizes: Sizes) -> list[list[str]]:
    """Network time per case of nnU-Net's predictor (nnU-Net's defaults; no nnUNet_diffusion_* override, and no
    torch.compile, which nnU-Net's predictor applies only when nnUNet_compile is set) on preprocessed cases."""
    configuration = space.plans_manager().get_configuration(space.configuration)
    folder = str(space.preprocessed / configuration.data_identifier)
    dataset_class = infer_dataset_class(folder)
    identifiers = sorted(dataset_class.get_identifiers(folder))[:sizes.cases + 1]
    dataset = dataset_class(folder, identifiers)
    images = [dataset.load_case(i)[0][:] for i in identifiers]
    if not sizes.whole_cases:
        images = [center_tile(image, list(configuration.patch_size)) for image in images]
    cases = [torch.from_numpy(np.ascontiguousarray(image)) for image in images]
    overrides = {name: None for name in (ENV_SAMPLER, ENV_STEPS, ENV_SEED, ENV_EARLY_EXIT, "nnUNet_compile")}
    predictors, steps = {}, {}
    with quiet(), environment(**overrides):
        for label, trainer in PREDICTED.items():  # stock first: the fine-tuned trainer starts from its checkpoint
            predictors[label] = nnUNetPredictor(use_mirroring=sizes.whole_cases, device=device, allow_tqdm=False)
            predictors[label].initialize_from_trained_model_folder(
                str(trained_model(space, device, trainer, sizes.iterations)), ("all",))
            network = unwrap(predictors[label].network)
            steps[label] = network.prediction_settings().steps if isinstance(network, DiffusionSegmentationNetwork) \
                else 1
            predictors[label].predict_logits_from_preprocessed_data(cases[0])  # warm-up (cuDNN autotuning)
        times: dict[str, list[float]] = {label: [] for label in PREDICTED}
        for index, case in enumerate(cases[1:]):
            labels = list(PREDICTED)[index % len(PREDICTED):] + list(PREDICTED)[:index % len(PREDICTED)]
            for label in labels:
                predictor = predictors[label]
                times[label].append(timed(lambda: predictor.predict_logits_from_preprocessed_data(case), device))
    cells = [f"{statistics.median(times[label]) * 1e3:.1f} ({steps[label]} "
             f"{'pass' if label == 'stock' else 'step' if steps[label] == 1 else 'steps'})" for label in PREDICTED]
    return [["predict per case, default steps (ms)", *cells, ratio_text(times)]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD Hippocampus in nnU-Net's raw layout "
                        "(default: ../shared/data/msd_hippocampus from the repository)")
    parser.add_argument("--workdir", type=Path, help="nnU-Net raw and preprocessed folders, kept so that a rerun "
                        "skips planning (default: a temporary folder, removed afterwards)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same checks on the CPU, small and quick")
    parser.add_argument("--repeats", type=int, help="timed train-step rounds (default: 10 on CUDA, 2 with "
                        "--cpu-smoke)")
    parser.add_argument("--cases", type=int, help="timed prediction cases (default: 3 on CUDA, 1 with --cpu-smoke)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke, or on a GPU machine")
    sizes = SMOKE_SIZES if args.cpu_smoke else CUDA_SIZES
    sizes = dataclasses.replace(sizes, repeats=args.repeats or sizes.repeats, cases=args.cases or sizes.cases)
    # one thread for the smoke too: on a small busy CPU, a second thread mostly waits for the first (tests/conftest.py)
    options = argparse.Namespace(dataset=None, preset="cpu_tiny" if args.cpu_smoke else None, plans=None,
                                 configuration=None, device=device.type, threads=1, clock="wall")
    configure_device(options)
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet_gpu_check_")))
        stack.enter_context(environment(nnUNet_raw=str(root / "nnUNet_raw"),
                                        nnUNet_preprocessed=str(root / "nnUNet_preprocessed")))
        options.dataset = prepare_dataset(args.data.resolve(), root.resolve(), sizes.subset)
        space = stack.enter_context(workspace(options))
        rows = training_rows(space, device, sizes) + predict_rows(space, device, sizes)
        header = environment_lines(device, space)
    elapsed = time.perf_counter() - start
    compiler = "nnU-Net's torch.compile (inductor)" if device.type == "cuda" else "torch.compile, aot_eager backend"
    over = f" (over the {CUDA_BUDGET_SECONDS} s budget)" if device.type == "cuda" and elapsed > CUDA_BUDGET_SECONDS \
        else ""
    print("\n".join([f"## GPU check{'' if device.type == 'cuda' else ' (--cpu-smoke: CPU, small)'}", "", *header,
                     f"- nnunetv2 {importlib.metadata.version('nnunetv2')}; compiled: {compiler}; train step: "
                     f"{sizes.repeats} timed rounds after {sizes.warmup} warm-up rounds, ratio: paired median "
                     f"[95 % bootstrap interval]; predict: {sizes.cases} case(s) after 1 warm-up case"
                     f"{'' if sizes.whole_cases else ' (patch-sized centre crops, no mirroring)'}, Recycle = "
                     f"{PREDICTED['Recycle']}", f"- peak memory: {memory_method(device)}",
                     f"- elapsed: {elapsed:.0f} s after imports{over}", "", markdown_table(HEADER, rows)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
