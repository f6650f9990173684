"""The options of the evaluation commands, each with the argument builder that fills it: how held-out cases are
predicted (`EvaluationOptions`), and where and how the trainings and predictions of a comparison run
(`ExecutionOptions`)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from nnunet_diffusion.core.scheduler import SAMPLERS

EXECUTORS = ("inline", "local", "slurm")


@dataclass(frozen=True)
class EvaluationOptions:
    """How to predict: folds and checkpoint as for nnUNetv2_predict, plus the sampling grid for diffusion models."""
    folds: tuple[int | str, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    samplers: tuple[str, ...] = ("ddpm", "ddim")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int | None = None  # None: each model's default (from its checkpoint), as nnUNetv2_predict samples
    early_exit: float | None = None
    per_k: bool = False
    device: str = "cuda"
    use_mirroring: bool = True
    save_probabilities: bool = False

    def __post_init__(self):
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown or not self.samplers:
            raise ValueError(f"samplers must be among {', '.join(SAMPLERS)}, got {', '.join(self.samplers) or 'none'}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")


@dataclass(frozen=True)
class ExecutionOptions:
    """Where the jobs of a comparison run: `inline` (one after another under this command), `local` (`jobs` at
    once on this machine, each on its own GPU of `gpus`) or `slurm` (submitted to the cluster and left there)."""
    executor: str = "inline"
    jobs: int = 1
    gpus: tuple[int, ...] = ()
    slurm_partition: str | None = None
    slurm_time_minutes: int = 24 * 60
    slurm_gpus: int = 0
    slurm_mem: str | None = None
    slurm_cpus: int | None = None
    slurm_params: tuple[tuple[str, str], ...] = ()
    save_every: int | None = None
    epoch_seconds: float | None = None  # stated epoch time for --dry-run where nothing has been measured yet
    wait: bool = False
    dry_run: bool = False
    report_only: bool = False

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {self.jobs}")
        if self.gpus and len(self.gpus) < self.jobs:
            raise ValueError(f"--gpus names {len(self.gpus)} GPU(s) for --jobs {self.jobs}: give one GPU per job")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"--save-every must be at least 1, got {self.save_every}")
        if self.dry_run and self.report_only:
            raise ValueError("--dry-run and --report-only exclude each other")


def add_sampling_arguments(parser: argparse.ArgumentParser, samplers: Sequence[str] = ("ddpm", "ddim"),
                           seeds: Sequence[int] = (0, 1, 2, 3, 4), device: str | None = None) -> None:
    """How held-out cases are predicted, shared by `evaluate`, `ablate` and `crossval`: checkpoint, sampling grid,
    device and test-time augmentation, with each command's defaults."""
    import torch
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--samplers", nargs="+", default=list(samplers), choices=SAMPLERS,
                        help=f"default: {' '.join(samplers)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds),
                        help="noise seeds per sampler (≥ 2 for the seed spread; default: "
                             f"{' '.join(map(str, seeds))})")
    parser.add_argument("--steps", type=int, help="sampling steps K (default: each model's own, as plain "
                        "nnUNetv2_predict samples: T for models trained from scratch, 1 for recycling fine-tuned "
                        "from stock); every step up to K is scored")
    parser.add_argument("-device", "--device", default=device,
                        help=f"cuda, cpu or mps, as for nnUNetv2_predict (default: {device})")
    parser.add_argument("--disable-tta", "--disable_tta", action="store_true", help="no mirroring at test time")
    parser.set_defaults(early_exit=None, per_k=False)


def add_step_study_arguments(parser: argparse.ArgumentParser) -> None:
    """`evaluate`: the folds a model predicts with and the step-count studies."""
    parser.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to use; their logits are averaged "
                        "as by nnUNetv2_predict (default: 0)")
    add_sampling_arguments(parser)
    parser.add_argument("--early-exit", type=float, metavar="TOL",
                        help="also sample with this early-exit tolerance and report the mean steps used and the "
                             "Dice cost against the full K steps")
    parser.add_argument("--per-k", action="store_true",
                        help="also run every diffusion model separately with K = 1 … T steps and report Dice and "
                             "predict time per case for each (and for early exit and the stock models)")


def options_from_args(args: argparse.Namespace, save_probabilities: bool) -> EvaluationOptions:
    return EvaluationOptions(folds=tuple(f if f == "all" else int(f) for f in args.folds),
                             checkpoint=args.checkpoint, samplers=tuple(args.samplers), seeds=tuple(args.seeds),
                             steps=args.steps, early_exit=args.early_exit, per_k=args.per_k, device=args.device,
                             use_mirroring=not args.disable_tta, save_probabilities=save_probabilities)


def _key_value(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. account=my_lab or qos=high")
    return key, value


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Where trainings and predictions run, how to watch them, and how often nnU-Net saves a resumable
    checkpoint."""
    group = parser.add_argument_group("execution (trainings and predictions as jobs)")
    group.add_argument("--executor", choices=EXECUTORS, default="inline",
                       help="inline: one after another under this command (default); local: --jobs at once on this "
                            "machine; slurm: submitted to the cluster, the command returns (re-run it to see the "
                            "state, or add --wait)")
    group.add_argument("--jobs", type=int, default=1, help="local: jobs at once; slurm: the GPUs you expect at once, "
                       "for --dry-run's wall-clock estimate (default 1)")
    group.add_argument("--gpus", type=int, nargs="+", default=[], help="local: the GPUs, one per job (e.g. 0 1 2 3)")
    group.add_argument("--slurm-partition")
    group.add_argument("--slurm-time", type=int, default=24 * 60, metavar="MINUTES",
                       help="time limit per job; a job stopped by it is requeued and resumes (default 1440)")
    group.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job (default 0)")
    group.add_argument("--slurm-mem", help="memory per job, e.g. 32G")
    group.add_argument("--slurm-cpus", type=int, help="CPUs per job (nnU-Net's augmentation workers)")
    group.add_argument("--slurm-param", nargs="+", default=[], type=_key_value, metavar="KEY=VALUE",
                       help="any further sbatch option, e.g. account=my_lab qos=high")
    group.add_argument("--save-every", type=int, help="epochs between nnU-Net's checkpoint_latest.pth, from which an "
                       "interrupted training resumes (nnU-Net's default: 50)")
    group.add_argument("--epoch-seconds", type=float, help="--dry-run: the epoch time to plan with where no "
                       "training of the trainer has logged one yet")
    group.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then write the report here")
    group.add_argument("--dry-run", action="store_true", help="print every unit with its state and the jobs a run "
                       "would submit, with the GPU-hours they need; run nothing")
    group.add_argument("--report-only", action="store_true", help="rewrite results.md/json and plots from what "
                       "exists and list what is missing; train and predict nothing")


def execution_from_args(args: argparse.Namespace) -> ExecutionOptions:
    return ExecutionOptions(args.executor, args.jobs, tuple(args.gpus), args.slurm_partition, args.slurm_time,
                            args.slurm_gpus, args.slurm_mem, args.slurm_cpus, tuple(args.slurm_param),
                            args.save_every, args.epoch_seconds, args.wait, args.dry_run, args.report_only)
