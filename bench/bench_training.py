"""Training-step time and peak memory of every plugin trainer relative to the stock nnUNetTrainer.

Absolute step times depend on the machine and on whatever else it runs, so the trainers are measured side by
side in one process, on the same pre-fetched batches, round-robin over repetitions (a slow spell hits all of them
alike), and only ratios to the stock trainer are compared with the targets. Each trainer is built and
initialised by nnU-Net itself (trainer lookup through nnUNet_extTrainer, plans, loss, optimizer, torch.compile
and AMP on CUDA), and the timed call is the trainer's own `train_step`; data loading and augmentation happen
before timing starts.

    python bench/bench_training.py                      # generated dataset, cpu_tiny plans, CPU
    python bench/bench_training.py --device cuda --dataset 500 --preset cpu_small
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from nnunetv2.run.run_training import get_trainer_from_args
from torch._dynamo import OptimizedModule

from benchutil import Workspace, benchmark_main, paired_ratio, quiet, result_row, synchronize, timed
from nnunet_diffusion.trainers.segmentation import SEGMENTATION_TRAINERS
from nnunet_diffusion.trainers.training_length import SHORT_SCHEDULE_TRAINERS

STOCK = "nnUNetTrainer"
# Stock variants that may be timed beside the plugin's: without deep supervision it shows what nnU-Net's
# deep-supervision heads and losses cost, which the plugin's trainers skip unless their name ends in DS.
STOCK_VARIANTS = ("nnUNetTrainerNoDeepSupervision",)
STEP_TARGETS = {"nnUNetTrainerDiffRecycle": 1.35, "nnUNetTrainerDiff": 1.05}
MEMORY_TARGET = 1.10
MIB = 2 ** 20


@dataclass(frozen=True)
class TrainerFigures:
    name: str
    step_seconds: float  # median over the timed repetitions
    step_ratio: float  # median over rounds of (step time / the stock trainer's step time in the same round)
    ratio_interval: tuple[float, float]  # 95 % bootstrap interval of that median, over rounds
    peak_bytes: int
    memory_ratio: float


@dataclass(frozen=True)
class TrainingBenchmark:
    figures: list[TrainerFigures]
    warmup: int
    repeats: int
    batches: int
    compiled: bool
    memory_method: str


def plugin_trainers() -> list[str]:
    """Every plugin trainer except the short-schedule copies, whose train_step is identical to their base's."""
    return [cls.__name__ for cls in SEGMENTATION_TRAINERS if cls not in SHORT_SCHEDULE_TRAINERS]


def comparable_trainers() -> list[str]:
    """What --trainers accepts, and times by default: the stock variants, then every plugin trainer."""
    return list(STOCK_VARIANTS) + plugin_trainers()


def build_trainer(name: str, space: Workspace, device: torch.device):
    """A trainer as nnUNetv2_train makes it (fold 'all', so no split file is written into the dataset)."""
    with quiet():
        trainer = get_trainer_from_args(space.dataset, space.configuration, "all", name, space.plans,
                                         device=device)
        trainer.initialize()
    return trainer


def fetch_batches(trainer, count: int, device: torch.device) -> list[dict]:
    """`count` augmented batches from nnU-Net's training dataloader, pinned on CUDA as nnU-Net's workers do."""
    with quiet():
        loader, _ = trainer.get_dataloaders()
    batches = [next(loader) for _ in range(count)]
    if device.type == "cuda":
        batches = [{"data": b["data"].pin_memory(), "target": [t.pin_memory() for t in b["target"]]}
                   for b in batches]
    return batches


def batch_for(trainer, batch: dict) -> dict:
    """The stock trainer's batch (deep-supervision target list) as this trainer's loss expects it.

    The plugin trainers train without deep supervision, so they get the full-resolution target, which is the
    first entry of the list nnU-Net's dataloader makes; images and full-resolution targets are the same tensors.
    """
    if trainer.enable_deep_supervision:
        return batch
    return {"data": batch["data"], "target": batch["target"][0]}


def time_steps(trainers: dict[str, object], batches: list[dict], warmup: int, repeats: int,
               device: torch.device) -> dict[str, list[float]]:
    """Step times per trainer; each round runs every trainer once, starting with a different one each round."""
    names = list(trainers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        batch = batches[round_index % len(batches)]
        for name in names[shift:] + names[:shift]:
            trainer = trainers[name]
            seconds = timed(lambda: trainer.train_step(batch_for(trainer, batch)), device)
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def persistent_bytes(trainer) -> int:
    """Bytes of the trainer's state that outlives a step (weights, buffers, optimizer state); no gradients."""
    tensors = list(trainer.network.state_dict().values())
    tensors += [value for state in trainer.optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _cpu_allocation_peak(step) -> int:
    """Highest net amount of CPU tensor memory allocated during `step`, from torch.profiler's allocation records."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    # The raw records, in time order (profiler.events() folds allocations into the operators that made them).
    records = sorted((e for e in profiler.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.start_ns())
    running = peak = 0
    for record in records:
        running += record.nbytes()
        peak = max(peak, running)
    return peak


def _cuda_allocation_peak(step, device: torch.device) -> int:
    """Peak of torch.cuda.max_memory_allocated during `step`, above what was allocated when it started."""
    synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def step_peak_bytes(trainer, batch: dict, device: torch.device) -> int:
    """Peak tensor memory of one training step of this trainer alone.

    All trainers share the process, so the peak is the trainer's own persistent state plus the highest amount the
    step allocated on top of what existed when it started. Gradients are dropped first (nnU-Net's train_step
    drops them anyway), so that they count once, inside the step.
    """
    trainer.optimizer.zero_grad(set_to_none=True)
    base = persistent_bytes(trainer)

    def step():
        trainer.train_step(batch_for(trainer, batch))

    return base + (_cuda_allocation_peak(step, device) if device.type == "cuda" else _cpu_allocation_peak(step))


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("weights + buffers + optimizer state + (torch.cuda.max_memory_allocated during one step, after "
                "reset_peak_memory_stats, minus memory_allocated at its start); batch copy and AMP casts included")
    return ("weights + buffers + optimizer state + peak net CPU tensor allocation during one step, from "
            "torch.profiler(profile_memory=True) allocation records; the input batch already in memory not counted")


def run_training_benchmark(space: Workspace, device: torch.device, warmup: int, repeats: int,
                           num_batches: int, only: list[str] | None = None) -> TrainingBenchmark:
    torch.manual_seed(0)
    unknown = sorted(set(only or ()) - set(comparable_trainers()))
    if unknown:
        raise SystemExit(f"--trainers: {', '.join(unknown)} cannot be compared; choose among "
                         f"{', '.join(comparable_trainers())}")
    names = [STOCK] + (only or comparable_trainers())
    trainers = {name: build_trainer(name, space, device) for name in names}
    batches = fetch_batches(trainers[STOCK], num_batches, device)
    times = time_steps(trainers, batches, warmup, repeats, device)
    peaks = {name: step_peak_bytes(trainers[name], batches[0], device) for name in names}
    figures = []
    for name in names:
        ratio, low, high = paired_ratio(times[name], times[STOCK])
        figures.append(TrainerFigures(name, statistics.median(times[name]), ratio, (low, high), peaks[name],
                                      peaks[name] / peaks[STOCK]))
    compiled = isinstance(trainers[STOCK].network, OptimizedModule)
    return TrainingBenchmark(figures, warmup, repeats, num_batches, compiled, memory_method(device))


def training_rows(result: TrainingBenchmark) -> list[list[str]]:
    """Rows of the shared table: step time and peak memory of every trainer relative to the stock one."""
    stock = next(f for f in result.figures if f.name == STOCK)
    plugins = [f for f in result.figures if f.name != STOCK]
    rows = [result_row("training step", f"{STOCK} (reference)", "1.000", f"{stock.step_seconds * 1e3:.1f} ms")]
    for f in plugins:
        low, high = f.ratio_interval
        rows.append(result_row("training step", f"{f.name} / {STOCK}", f"{f.step_ratio:.3f} [{low:.3f}, {high:.3f}]",
                               f"{f.step_seconds * 1e3:.1f} ms", STEP_TARGETS.get(f.name), f.step_ratio,
                               f.ratio_interval))
    rows.append(result_row("training peak memory", f"{STOCK} (reference)", "1.000",
                           f"{stock.peak_bytes / MIB:.1f} MiB"))
    for f in plugins:
        target = MEMORY_TARGET if f.name in STEP_TARGETS else None
        rows.append(result_row("training peak memory", f"{f.name} / {STOCK}", f"{f.memory_ratio:.3f}",
                               f"{f.peak_bytes / MIB:.1f} MiB", target, f.memory_ratio))
    return rows


def training_notes(result: TrainingBenchmark) -> list[str]:
    return [f"- training step: {result.repeats} timed rounds after {result.warmup} warm-up rounds, trainers "
            f"round-robin on the same {result.batches} pre-fetched batches; ratio: median over rounds of the time "
            f"over the stock trainer's in the same round, [95 % bootstrap interval]; met: yes when the whole "
            f"interval is within the target, no when none of it is; torch.compile: "
            f"{'on' if result.compiled else 'off'}",
            f"- training peak memory: {result.memory_method}"]


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (torch.compile, cuDNN "
                        "autotuning, allocator warm-up)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds; each runs every trainer once")
    parser.add_argument("--batches", type=int, default=4, help="distinct pre-fetched batches, cycled")
    parser.add_argument("--trainers", nargs="+", help=f"trainers to compare with the stock one: the plugin's or "
                        f"{', '.join(STOCK_VARIANTS)} (default: all of them)")


def training_benchmark_from_args(space: Workspace, device: torch.device,
                                 args: argparse.Namespace) -> TrainingBenchmark:
    return run_training_benchmark(space, device, args.warmup, args.repeats, args.batches, args.trainers)


def main() -> None:
    def measure(space: Workspace, device: torch.device, args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
        result = training_benchmark_from_args(space, device, args)
        return training_notes(result), training_rows(result)

    benchmark_main(__doc__, [add_training_arguments], measure)


if __name__ == "__main__":
    main()
