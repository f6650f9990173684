"""Cached probing on a planned nnU-Net dataset: the probe network as `nnUNetv2_train -pretrained_weights` builds
it, its head trained on cached frozen features of the dataset's preprocessed training cases (`cached_probing`),
and its held-out cases (imagesTs) predicted by nnU-Net's predictor.

A probe trainer runs the frozen backbone in every iteration; here it runs once per backbone, so that several probe
seeds per backbone are affordable on a CPU, and the trained head is the probe network's own head, so the
predictions are those of the probe network.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_diffusion.pretraining.cached_probing import cached_features, train_head_on_cached
from nnunet_diffusion.pretraining.heads import NonLinearProbeHead


@dataclass(frozen=True)
class ProbeDataset:
    """A labelled dataset, preprocessed with the plans of the backbone's pretraining dataset (docs/pretraining.md,
    section 5): its training cases train the head, its held-out cases are predicted."""
    raw: Path  # nnUNet_raw/Dataset<id>_<name>, with imagesTs and labelsTs
    preprocessed: Path  # nnUNet_preprocessed/Dataset<id>_<name>
    plans: str = "nnUNetPlansCPU"
    configuration: str = "3d_cpu"


@dataclass(frozen=True)
class HeadTraining:
    """How a head is trained on cached features: voxels sampled per tile (half of them foreground), then Adam
    steps on batches of voxels with cross-entropy."""
    voxels_per_tile: int
    iterations: int
    learning_rate: float
    batch_voxels: int
    tile: int = 32  # the cpu_tiny preset's patch size
    stride: int = 16  # tiles overlapping by half, as in nnU-Net's sliding-window inference


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def probe_plans(dataset: ProbeDataset) -> tuple[PlansManager, ConfigurationManager, dict]:
    """The dataset's plans, the configuration the probe runs in, and its dataset.json, as nnU-Net's trainer reads
    them."""
    plans_manager = PlansManager(str(dataset.preprocessed / f"{dataset.plans}.json"))
    dataset_json = json.loads((dataset.preprocessed / "dataset.json").read_text())
    return plans_manager, plans_manager.get_configuration(dataset.configuration), dataset_json


def num_classes(dataset: ProbeDataset) -> int:
    plans_manager, _, dataset_json = probe_plans(dataset)
    return plans_manager.get_label_manager(dataset_json).num_segmentation_heads


def probe_cases(dataset: ProbeDataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, labels) of every preprocessed training case; voxels outside nnU-Net's crop mask (−1) are
    background."""
    folder = dataset.preprocessed / probe_plans(dataset)[1].data_identifier
    cases = infer_dataset_class(str(folder))(str(folder))
    for key in cases.identifiers:
        data, seg, _, _ = cases.load_case(key)
        yield torch.from_numpy(np.asarray(data)).float(), torch.from_numpy(np.asarray(seg)[0]).long().clamp_(min=0)


def cached_dataset_features(features_of: Callable[[torch.Tensor], torch.Tensor], dataset: ProbeDataset,
                            training: HeadTraining, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (`features_of`, e.g. `cached_probing.decoder_features_of(network)`) and labels of a sample of the
    training cases' voxels, drawn once per backbone and shared by its probe seeds."""
    return cached_features(features_of, probe_cases(dataset), training.tile, training.stride,
                           training.voxels_per_tile, seed)


def train_head(head: torch.nn.Module, level_channels: Sequence[int], features: tuple[torch.Tensor, torch.Tensor],
               seed: int, training: HeadTraining) -> list[float]:
    """The head trained in place on cached (features, labels); returns the losses."""
    return train_head_on_cached(head, level_channels, *features, training.iterations, training.learning_rate,
                                training.batch_voxels, seed)


def probe_network(probe_trainer: type, dataset: ProbeDataset, weights: Path, seed: int) -> torch.nn.Module:
    """The network of `probe_trainer` (a probe trainer class) as nnUNetv2_train builds it for the dataset, the
    backbone copied in by nnU-Net's `load_pretrained_weights` (what -pretrained_weights does); the head
    initialised from `seed`."""
    plans_manager, configuration, dataset_json = probe_plans(dataset)
    seed_everything(seed)
    network = probe_trainer.build_network_architecture(
        plans_manager, configuration, len(dataset_json["channel_names"]),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, False)
    load_pretrained_weights(network, str(weights))
    return network.eval()


class VoxelMLP(torch.nn.Module):
    """The probe head on the first `channels` input channels themselves, no backbone: what the input alone gives a
    probe (e.g. the intensity; the intensity and the coordinates)."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.channels = channels
        self.head = NonLinearProbeHead([channels], classes, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head([x[:, :self.channels]], x.shape[2:])


def predict_test_cases(network: torch.nn.Module, dataset: ProbeDataset, trainer_name: str, output: Path,
                       device: str) -> None:
    """nnU-Net's predictor (what nnUNetv2_predict runs) on the held-out cases, without test-time mirroring."""
    # imported here: it imports nnunetv2.paths, which reads the nnUNet_* variables once, and callers set them first
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    plans_manager, configuration, dataset_json = probe_plans(dataset)
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device(device), allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, [network.state_dict()], dataset_json,
                                    trainer_name, None)
    predictor.predict_from_files(str(dataset.raw / "imagesTs"), str(output), save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=1, num_processes_segmentation_export=1)
