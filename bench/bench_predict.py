"""Prediction cost of a diffusion model against the stock model, as a user meets it: the stock command.

Both models (nnUNetv2_train output folders of the same dataset and configuration) predict the same images with
`nnUNetv2_predict_from_modelfolder`, alternating round by round, with test-time mirroring on and off
(`--mirroring`); the diffusion model at its own default sampling (what its checkpoint carries) and, on request, at
other step counts (`--steps`) and with early exit (`--early-exit`). Per run it records

- the wall clock of the whole command (nnU-Net's default preprocessing/export processes, start-up included),
- the network time per case, from nnU-Net's own `Predicting <case>` / `done with <case>` lines, timestamped as
  they arrive (so the first case can be compared with the others),
- the CPU time of the command and its children (user + system, all threads),
- with `--reference`, the mean Dice of the written segmentations (the cost of fewer steps or of early exit).

The ratios diffusion / stock are printed as a Markdown table. `--device cuda` runs the same commands on a GPU,
where nnU-Net's predictor uses AMP by itself.

    python bench/bench_predict.py --stock RESULTS/Dataset990_X/nnUNetTrainer__nnUNetPlansCPU__3d_cpu \\
        --diffusion RESULTS/Dataset990_X/nnUNetTrainerDiffRecycle__nnUNetPlansCPU__3d_cpu -i imagesTs -r labelsTs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_diffusion.core.sampling import ENV_EARLY_EXIT, ENV_SAMPLER, ENV_SEED, ENV_STEPS
from nnunet_diffusion.environment import with_plugin_environment
from nnunet_diffusion.utils import markdown_table


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # "stock" or "diffusion"
    mirroring: bool
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Measurement:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_case: list[float] = field(default_factory=list)
    other_cases: list[float] = field(default_factory=list)
    dice: float | None = None


def variants(early_exit: float | None, steps: list[int], mirroring: tuple[bool, ...]) -> list[Variant]:
    """Stock, the diffusion model at its own default sampling (what plain `nnUNetv2_predict` runs), at each of
    `steps`, and with early exit; each with and without mirroring."""
    out = []
    for mirror in mirroring:
        suffix = "" if mirror else ", no mirroring"
        out += [Variant(f"stock{suffix}", "stock", mirror),
                Variant(f"diffusion, its default{suffix}", "diffusion", mirror, {ENV_SEED: "0"})]
        out += [Variant(f"diffusion, {k} steps{suffix}", "diffusion", mirror, {ENV_SEED: "0", ENV_STEPS: str(k)})
                for k in steps]
        if early_exit is not None:
            out.append(Variant(f"diffusion, early exit {early_exit}{suffix}", "diffusion", mirror,
                               {ENV_SEED: "0", ENV_EARLY_EXIT: str(early_exit)}))
    return out


def predict_once(variant: Variant, folder: Path, args: argparse.Namespace, output: Path) -> tuple[float, float,
                                                                                                   list[float]]:
    """Wall clock, CPU time and per-case network seconds of one stock prediction command."""
    command = ["nnUNetv2_predict_from_modelfolder", "-i", str(args.images), "-o", str(output), "-m", str(folder),
               "-f", *args.folds, "-device", args.device, "--disable_progress_bar"]
    if args.processes:
        command += ["-npp", str(args.processes), "-nps", str(args.processes)]
    if not variant.mirroring:
        command.append("--disable_tta")
    # unbuffered, so that nnU-Net's per-case lines arrive (and are timestamped) when they are printed
    env = {**with_plugin_environment(), **variant.env, "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    started: dict[str, float] = {}
    cases: list[float] = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        log = []
        for line in process.stdout:
            log.append(line)
            now = time.perf_counter()
            if line.startswith("Predicting "):
                started[line.split()[1].rstrip(":")] = now
            elif line.startswith("done with "):
                case = line.split()[2]
                cases.append(now - started.pop(case, now))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{''.join(log[-40:])}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, cases


def mean_dice(predictions: Path, reference: Path) -> float:
    from nnunet_diffusion.evaluation.metrics import evaluate_folder
    dataset_json = json.loads((predictions / "dataset.json").read_text())
    labels = [v for k, v in dataset_json["labels"].items() if k != "background" and k != "ignore"]
    return evaluate_folder(predictions, reference, labels, dataset_json["file_ending"])["foreground_mean"]["Dice"]


def run(args: argparse.Namespace) -> dict[str, Measurement]:
    folders = {"stock": args.stock, "diffusion": args.diffusion}
    measured = {v.name: Measurement() for v in variants(args.early_exit, args.steps, args.mirroring)}
    with tempfile.TemporaryDirectory(prefix="nnunet_diffusion_bench_predict_") as scratch:
        for round_index in range(args.warmup + args.repeats):
            order = variants(args.early_exit, args.steps, args.mirroring)
            order = order[round_index % len(order):] + order[:round_index % len(order)]
            for variant in order:
                output = Path(scratch) / f"{round_index}" / variant.name.replace(" ", "_").replace(",", "")
                wall, cpu, cases = predict_once(variant, folders[variant.model], args, output)
                print(f"round {round_index + 1}: {variant.name}: {wall:.1f} s wall, {cpu:.1f} s CPU, cases "
                      f"{', '.join(f'{c:.1f}' for c in cases)} s", flush=True)
                if round_index < args.warmup:
                    continue
                m = measured[variant.name]
                m.wall.append(wall)
                m.cpu.append(cpu)
                m.first_case.append(cases[0])
                m.other_cases += cases[1:]
                if args.reference and m.dice is None:
                    m.dice = mean_dice(output, args.reference)
    return measured


def report(measured: dict[str, Measurement], args: argparse.Namespace) -> str:
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def per_case(m: Measurement) -> float:
        return median(m.other_cases) if m.other_cases else median(m.first_case)

    processes = f"-npp/-nps {args.processes}" if args.processes else "nnU-Net's default processes"
    rows = []
    for name, m in measured.items():
        stock = measured["stock" if "no mirroring" not in name else "stock, no mirroring"]
        first_ratio = median(m.first_case) / median(m.other_cases) if m.other_cases else float("nan")
        rows.append([name, f"{median(m.wall):.1f}", f"{median(m.wall) / median(stock.wall):.2f}",
                     f"{per_case(m):.2f}", f"{per_case(m) / per_case(stock):.2f}", f"{first_ratio:.2f}",
                     f"{median(m.cpu):.1f}", f"{median(m.cpu) / median(stock.cpu):.2f}",
                     f"{m.dice:.4f}" if m.dice is not None else ""])
    header = ["run", "command wall (s)", "× stock", "network per case (s)", "× stock", "first case / others",
              "CPU (s)", "× stock", "Dice"]
    return f"Prediction, {args.device}, {processes}, {args.repeats} rounds (median), images {args.images}\n\n" + \
        markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock", type=Path, required=True, help="model folder of a stock (one-pass) trainer")
    parser.add_argument("--diffusion", type=Path, required=True, help="model folder of a diffusion trainer")
    parser.add_argument("-i", "--images", type=Path, required=True)
    parser.add_argument("-r", "--reference", type=Path, help="reference segmentations, to report Dice")
    parser.add_argument("-f", "--folds", nargs="+", default=["0"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--early-exit", type=float, help="also with this nnUNet_diffusion_early_exit tolerance")
    parser.add_argument("--steps", type=int, nargs="+", default=[], help="also with these nnUNet_diffusion_steps "
                        "(the model's default sampling, from its checkpoint, always runs)")
    parser.add_argument("--mirroring", choices=("both", "on", "off"), default="both",
                        help="test-time mirroring of every run (default: both, each its own row)")
    parser.add_argument("--processes", type=int,
                        help="nnU-Net's -npp and -nps (default: nnU-Net's, 3 each); 1 shows what the background "
                             "preprocessing and export workers cost the first case")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    args.mirroring = {"both": (True, False), "on": (True,), "off": (False,)}[args.mirroring]
    for folder in (args.stock, args.diffusion):
        if not (folder / "plans.json").is_file():
            raise SystemExit(f"{folder} is not an nnUNetv2_train output folder (no plans.json)")
    if any(os.environ.get(name) for name in (ENV_EARLY_EXIT, ENV_STEPS, ENV_SAMPLER)):
        raise SystemExit(f"unset {ENV_EARLY_EXIT}, {ENV_STEPS} and {ENV_SAMPLER}: the benchmark runs each model at "
                         f"its own default and sets the others per run")
    print(report(run(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
