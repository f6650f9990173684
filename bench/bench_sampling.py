"""Cost of the diffusion sampler relative to the denoiser forwards it consists of, and the steps early exit saves.

A K-step sampling call `network(image)` (what nnU-Net's predictor calls per tile) should cost little more than K
bare forwards `network.denoise(image, x_t, t)`: anything above is sampler overhead (noise, decoding, scheduler
update). Both are timed side by side on the same tile, interleaved over repetitions, and only their ratio is
compared with the target. Early exit is reported as the mean number of steps used; it only means something for
a trained network (--checkpoint), an untrained one is reported as such.

    python bench/bench_sampling.py                      # generated dataset, cpu_tiny plans, untrained network
    python bench/bench_sampling.py --dataset 990 --checkpoint .../fold_0/checkpoint_final.pth --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from benchutil import Workspace, benchmark_main, quiet, result_row, timed
from nnunet_diffusion.checkpoints import load_checkpoint
from nnunet_diffusion.core.diffusion_network import DiffusionSegmentationNetwork
from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.core.scheduler import SAMPLERS

DEFAULT_TRAINER = "nnUNetTrainerDiffRecycle"
SAMPLING_TARGET = 1.05


@dataclass(frozen=True)
class StepsFigures:
    steps: int
    sampling_seconds: float  # median of network(image) with K steps
    forwards_seconds: float  # median of K bare denoiser forwards

    @property
    def ratio(self) -> float:
        return self.sampling_seconds / self.forwards_seconds


@dataclass(frozen=True)
class SamplingBenchmark:
    network: str  # which network and weights, in words
    trained: bool
    sampler: str
    num_timesteps: int
    figures: list[StepsFigures]
    early_exit: dict[float, float]  # tolerance -> mean steps used
    warmup: int
    repeats: int
    tiles: int


def load_network(space: Workspace, device: torch.device, trainer_name: str,
                 checkpoint: Path | None) -> tuple[DiffusionSegmentationNetwork, object, str]:
    """The network nnU-Net's predictor would build (trainer's build_network_architecture, no deep supervision).

    With a checkpoint, trainer, plans and configuration are the ones it was trained with, as for prediction.
    Returns the network in eval mode, its configuration manager and a description.
    """
    state = None
    if checkpoint is None:
        plans = json.loads((space.preprocessed / f"{space.plans}.json").read_text())
        configuration = space.configuration
        dataset_json = json.loads((space.preprocessed / "dataset.json").read_text())
        description = f"{trainer_name}, untrained (initial weights)"
    else:
        state = load_checkpoint(checkpoint, map_location=device)
        trainer_name = state["trainer_name"]
        plans, configuration = state["init_args"]["plans"], state["init_args"]["configuration"]
        dataset_json = state["init_args"]["dataset_json"]
        description = (f"{trainer_name}, {state['current_epoch']} epoch(s) trained, plans {plans['plans_name']}, "
                       f"configuration {configuration} ({checkpoint})")
    plans_manager = PlansManager(plans)
    if plans_manager.dataset_name != space.dataset:
        raise SystemExit(f"the checkpoint was trained on {plans_manager.dataset_name}, the tiles would come from "
                         f"{space.dataset}; pass --dataset {plans_manager.dataset_name}")
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    with quiet():
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads, False)
    if not isinstance(network, DiffusionSegmentationNetwork):
        raise SystemExit(f"{trainer_name} is not a diffusion trainer of this plugin")
    network.set_mask_activation("sigmoid" if label_manager.has_regions else "softmax")
    if state is not None:
        network.load_state_dict(state["network_weights"])
    return network.to(device).eval(), configuration_manager, description


def center_tile(image: np.ndarray, patch_size: list[int]) -> np.ndarray:
    """A patch-sized tile from the centre of a (C, *spatial) case, zero-padded as nnU-Net's predictor pads."""
    missing = [max(p - s, 0) for s, p in zip(image.shape[1:], patch_size)]
    image = np.pad(image, [(0, 0)] + [(m // 2, m - m // 2) for m in missing])
    start = [(s - p) // 2 for s, p in zip(image.shape[1:], patch_size)]
    return image[(slice(None),) + tuple(slice(b, b + p) for b, p in zip(start, patch_size))]


def load_tiles(space: Workspace, configuration_manager, count: int, device: torch.device) -> list[torch.Tensor]:
    """Tiles (1, C, *patch) of preprocessed training cases: realistic inputs for early exit."""
    folder = str(space.preprocessed / configuration_manager.data_identifier)
    dataset_class = infer_dataset_class(folder)
    identifiers = sorted(dataset_class.get_identifiers(folder))[:count]
    dataset = dataset_class(folder, identifiers)
    return [torch.from_numpy(np.ascontiguousarray(center_tile(dataset.load_case(i)[0][:],
                                                              list(configuration_manager.patch_size))))
            .float()[None].to(device) for i in identifiers]


def precision(device: torch.device):
    """Autocast on CUDA, as nnU-Net's predictor runs the network."""
    return torch.autocast("cuda") if device.type == "cuda" else contextlib.nullcontext()


def time_sampling(network: DiffusionSegmentationNetwork, tile: torch.Tensor, sampler: str, warmup: int,
                  repeats: int, device: torch.device) -> list[StepsFigures]:
    """Median times of K-step sampling and of K bare forwards for every K, interleaved, order alternating."""
    x_t = torch.randn((1, network.num_mask_channels, *tile.shape[2:]), device=device)
    timesteps = {k: [torch.full((1,), t, device=device) for t in network.scheduler.set_timesteps(k).tolist()]
                 for k in range(1, network.num_timesteps + 1)}
    times: dict[tuple[str, int], list[float]] = {}
    for round_index in range(warmup + repeats):
        for k, ts in timesteps.items():
            with network.sampling_with(SamplerSettings(sampler, k)):
                calls = [("sampling", lambda: network(tile)),
                         ("forwards", lambda: [network.denoise(tile, x_t, t) for t in ts])]
                for kind, call in calls[::-1] if round_index % 2 else calls:
                    seconds = timed(call, device)
                    if round_index >= warmup:
                        times.setdefault((kind, k), []).append(seconds)
    return [StepsFigures(k, statistics.median(times["sampling", k]), statistics.median(times["forwards", k]))
            for k in timesteps]


def early_exit_steps(network: DiffusionSegmentationNetwork, tiles: list[torch.Tensor], sampler: str,
                     tolerance: float, draws: int) -> float:
    """Mean number of steps the sampler runs with nnUNet_diffusion_early_exit=tolerance (at most T)."""
    settings = SamplerSettings(sampler, network.num_timesteps, early_exit_tolerance=tolerance)
    return statistics.mean(sum(1 for _ in network.sample_steps(tile, settings))
                           for tile in tiles for _ in range(draws))


def run_sampling_benchmark(space: Workspace, device: torch.device, trainer_name: str, checkpoint: Path | None,
                           sampler: str, tolerances: list[float], warmup: int, repeats: int, tiles: int,
                           draws: int) -> SamplingBenchmark:
    torch.manual_seed(0)
    network, configuration_manager, description = load_network(space, device, trainer_name, checkpoint)
    images = load_tiles(space, configuration_manager, tiles, device)
    with torch.inference_mode(), precision(device):
        figures = time_sampling(network, images[0], sampler, warmup, repeats, device)
        early_exit = {tol: early_exit_steps(network, images, sampler, tol, draws) for tol in tolerances}
    return SamplingBenchmark(description, checkpoint is not None, sampler, network.num_timesteps, figures,
                             early_exit, warmup, repeats, len(images))


def sampling_rows(result: SamplingBenchmark) -> list[list[str]]:
    """Rows of the shared table: sampling / (K x forward) per K, then the mean steps used with early exit."""
    rows = [result_row("sampling", f"{f.steps}-step network(image) / {f.steps} x denoise", f"{f.ratio:.3f}",
                       f"{f.sampling_seconds * 1e3:.1f} / {f.forwards_seconds * 1e3:.1f} ms", SAMPLING_TARGET,
                       f.ratio) for f in result.figures]
    state = "trained" if result.trained else "untrained, not meaningful"
    rows += [result_row("early exit", f"tolerance {tol:g}: mean steps used / {result.num_timesteps}",
                        f"{steps / result.num_timesteps:.3f}", f"{steps:.2f} steps ({state})")
             for tol, steps in result.early_exit.items()]
    return rows


def sampling_notes(result: SamplingBenchmark) -> list[str]:
    return [f"- sampling: {result.network}; sampler {result.sampler}, T = {result.num_timesteps}; one tile of "
            f"batch 1 as nnU-Net's predictor runs it, under inference_mode (and autocast on CUDA); median of "
            f"{result.repeats} interleaved rounds after {result.warmup} warm-up rounds",
            f"- early exit: mean over {result.tiles} centre tiles of preprocessed training cases x fresh noise "
            f"draws" + ("" if result.trained else "; the network is untrained, so these counts say nothing about "
                        "a trained model (pass --checkpoint)")]


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, help="diffusion trainer whose network is built "
                        "(ignored with --checkpoint, which names its own)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint_final.pth of a diffusion trainer trained on "
                        "the benchmarked dataset: its trainer, plans, configuration and weights are used")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.05, 0.01],
                        help="early-exit tolerances (nnUNet_diffusion_early_exit)")
    parser.add_argument("--sampling-warmup", type=int, default=2, help="untimed sampling rounds first")
    parser.add_argument("--sampling-repeats", type=int, default=10, help="timed rounds; each times every K")
    parser.add_argument("--tiles", type=int, default=4, help="preprocessed cases whose centre tile is used")
    parser.add_argument("--draws", type=int, default=3, help="noise draws per tile for early exit")


def sampling_benchmark_from_args(space: Workspace, device: torch.device,
                                 args: argparse.Namespace) -> SamplingBenchmark:
    return run_sampling_benchmark(space, device, args.trainer, args.checkpoint, args.sampler, args.tolerances,
                                  args.sampling_warmup, args.sampling_repeats, args.tiles, args.draws)


def main() -> None:
    def measure(space: Workspace, device: torch.device, args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
        result = sampling_benchmark_from_args(space, device, args)
        return sampling_notes(result), sampling_rows(result)

    benchmark_main(__doc__, [add_sampling_arguments], measure)


if __name__ == "__main__":
    main()
