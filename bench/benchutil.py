"""Shared set-up of the benchmarks: the nnU-Net workspace, the device, timing and the environment header.

The benchmarks go through nnU-Net's own machinery (plans, trainer lookup, dataloaders), so they need the usual
nnU-Net folders. By default they generate the plugin's synthetic dataset in a temporary workspace that is deleted
afterwards; with --dataset they read an existing preprocessed dataset. Either way nnUNet_results points at a
temporary folder, because constructing a trainer writes log files there.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value
from nnunet_diffusion.plans import (available_presets, derived_plans_name, load_preset, plan_and_preprocess_with_preset,
                                    write_preset_plans)
from nnunet_diffusion import utils
from nnunet_diffusion.utils import environment

SYNTHETIC_ID = 990
SYNTHETIC_NAME = "DiffusionDemo"
DEFAULT_PRESET = "cpu_tiny"
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA",
                    EXT_TRAINER_VARIABLE)


@dataclass(frozen=True)
class Workspace:
    """Which preprocessed dataset, plans and configuration a benchmark runs on."""
    dataset: str  # DatasetXXX_Name, as nnU-Net's lookups accept it
    plans: str
    configuration: str
    preprocessed: Path  # $nnUNet_preprocessed/<dataset>
    generated: bool

    def plans_manager(self) -> PlansManager:
        return PlansManager(str(self.preprocessed / f"{self.plans}.json"))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every benchmark script (run_all passes them through)."""
    parser.add_argument("--dataset", help="id or name of a dataset already preprocessed under $nnUNet_preprocessed "
                        "(default: generate the synthetic dataset in a temporary workspace)")
    parser.add_argument("--preset", choices=available_presets(),
                        help=f"derive this plans preset (written next to the dataset's nnUNetPlans.json) and use "
                        f"its plans and configuration (default for the generated dataset: {DEFAULT_PRESET})")
    parser.add_argument("--plans", help="plans identifier (default: the preset's, else nnUNetPlans)")
    parser.add_argument("--configuration", help="configuration (default: the preset's, else 3d_fullres)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: nnU-Net's choice, all cores on "
                        "CPU and 1 on CUDA)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time, which other processes "
                        "on a shared machine hardly disturb (use with --device cpu --threads 1)")


def configure_device(args: argparse.Namespace) -> torch.device:
    """The device, with the thread count and cuDNN settings nnUNetv2_train would use on it, and the clock."""
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        torch.set_num_interop_threads(1)
    torch.set_num_threads(args.threads or (multiprocessing.cpu_count() if device.type == "cpu" else 1))
    return device


@contextlib.contextmanager
def workspace(args: argparse.Namespace) -> Iterator[Workspace]:
    """Set nnU-Net's environment for this process and yield the workspace; temporary folders are removed after."""
    unchanged = {name: os.environ.get(name) for name in NNUNET_VARIABLES}
    with environment(**unchanged), tempfile.TemporaryDirectory(prefix="nnunet_diffusion_bench_") as scratch:
        scratch = Path(scratch)
        os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()  # nnU-Net's lookup finds the plugin's trainers
        os.environ["nnUNet_results"] = str(scratch / "nnUNet_results")
        space = _generated_workspace(scratch, args) if args.dataset is None else _existing_workspace(args)
        # Set after planning, whose VRAM estimate calls torch.set_num_threads with this value.
        os.environ["nnUNet_n_proc_DA"] = "0"  # batches come from the main process: no augmentation workers
        yield space


def _generated_workspace(scratch: Path, args: argparse.Namespace) -> Workspace:
    from nnunet_diffusion.datasets.synthetic import generate_synthetic_dataset
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        os.environ[name] = str(scratch / name)
    raw = generate_synthetic_dataset(scratch / "nnUNet_raw", SYNTHETIC_ID, SYNTHETIC_NAME, num_train=8, num_test=0,
                                     shape=(32, 32, 32), seed=0)
    preset = args.preset or DEFAULT_PRESET
    plan_and_preprocess_with_preset(SYNTHETIC_ID, preset, scratch / "nnUNet_preprocessed", run_quietly,
                                    processes=min(4, multiprocessing.cpu_count()))
    preprocessed = scratch / "nnUNet_preprocessed" / raw.name
    return _with_plans(raw.name, preprocessed, preset, args, generated=True)


def run_quietly(command: list[str]) -> None:
    """A command whose output is shown only when it fails (nnU-Net's planning prints pages)."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def _existing_workspace(args: argparse.Namespace) -> Workspace:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    name = maybe_convert_to_dataset_name(args.dataset)
    return _with_plans(name, Path(nnUNet_preprocessed) / name, args.preset, args, generated=False)


def _with_plans(dataset: str, preprocessed: Path, preset: str | None, args: argparse.Namespace,
                generated: bool) -> Workspace:
    plans, configuration = "nnUNetPlans", "3d_fullres"
    if preset is not None:
        write_preset_plans(preprocessed, preset)
        values = load_preset(preset)
        plans, configuration = derived_plans_name(plans, values), values["configuration"]
    return Workspace(dataset, args.plans or plans, args.configuration or configuration, preprocessed, generated)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence nnU-Net's console prints (citation banner, plans) so that the report stays readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_clock: Callable[[], float] = time.perf_counter


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Time of one call in seconds on the chosen clock, waiting for queued GPU work before and after."""
    synchronize(device)
    start = _clock()
    function()
    synchronize(device)
    return _clock() - start


def paired_ratio(times: list[float], reference: list[float], draws: int = 2000) -> tuple[float, float, float]:
    """Median over rounds of the time ratio to the reference in the same round, with a 95 % bootstrap interval.

    A round runs every variant once, back to back, so a slow spell of the machine (other tenants, CPU steal) that
    lasts longer than a round slows both sides of each ratio alike: the paired ratio is far steadier than the ratio
    of two medians."""
    ratios = [t / r for t, r in zip(times, reference)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment_lines(device: torch.device, workspace: Workspace) -> list[str]:
    """Markdown bullet lines naming what the ratios were measured on."""
    configuration = workspace.plans_manager().get_configuration(workspace.configuration)
    kwargs = configuration.network_arch_init_kwargs
    versions = f"torch {torch.__version__}"
    if device.type == "cuda":
        versions += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, AMP (as nnU-Net)"
    return [f"- device: {device.type} ({device_name(device)}), {versions}",
            f"- torch threads: {torch.get_num_threads()} (of {multiprocessing.cpu_count()} logical CPUs); "
            f"clock: {'process CPU time' if _clock is time.process_time else 'wall time'}",
            f"- dataset: {workspace.dataset}{' (generated)' if workspace.generated else ''}, plans "
            f"{workspace.plans}, configuration {workspace.configuration}",
            f"- plan: patch size {list(configuration.patch_size)}, batch size {configuration.batch_size}, "
            f"features per stage {list(kwargs['features_per_stage'])}, "
            f"{configuration.network_arch_class_name.rsplit('.', 1)[-1]}"]


TABLE_HEADER = ["benchmark", "compared", "ratio", "target", "met", "measured"]


def result_row(benchmark: str, compared: str, ratio: str, measured: str, target: float | None = None,
               value: float | None = None, interval: tuple[float, float] | None = None) -> list[str]:
    """One row of the shared table; a target is always a ratio, never an absolute time. With an interval of the
    ratio, a target is met or missed only when the whole interval says so ("within noise" otherwise)."""
    if target is None:
        return [benchmark, compared, ratio, "", "", measured]
    if interval is None:
        met = "yes" if value <= target else "no"
    else:
        met = "yes" if interval[1] <= target else "no" if interval[0] > target else "within noise"
    return [benchmark, compared, ratio, f"<= {target:.2f}", met, measured]


def benchmark_main(description: str, add_arguments: list[Callable[[argparse.ArgumentParser], None]],
                   measure: Callable[[Workspace, torch.device, argparse.Namespace], tuple[list[str], list[list[str]]]],
                   title: str | None = None) -> None:
    """The command line every benchmark shares: parse, choose the device, measure in a prepared workspace, then
    print the environment, the benchmark's notes and its ratio table."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    for add in add_arguments:
        add(parser)
    args = parser.parse_args()
    device = configure_device(args)
    with workspace(args) as space:
        notes, rows = measure(space, device, args)
        header = environment_lines(device, space) + notes
    print("\n".join(([title, ""] if title else []) + header))
    print()
    print(benchmark_table(rows))


def benchmark_table(rows: list[list[str]]) -> str:
    """The ratio table every benchmark prints (TABLE_HEADER columns)."""
    return utils.markdown_table(TABLE_HEADER, rows)
