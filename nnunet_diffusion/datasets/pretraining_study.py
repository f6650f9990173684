"""The datasets of the frozen-probe pretraining study (`experiments/pretraining_phantom.py`), prepared as
docs/pretraining.md describes it for any pretraining and probe dataset.

Phantom: an unlabelled pretraining phantom and a labelled probe phantom are generated; the pretraining phantom is
planned with the preset and the probe phantom preprocessed with its plans (docs/pretraining.md, section 5); a BPR
is trained on the pretraining phantom; both get its coordinate channels, the probe phantom also its true
coordinates from the image geometry; the coordinate datasets are planned in the same way. Hippocampus: the shared
MR images as the pretraining dataset (labels ignored) and, with the same plans, a probe dataset of a seeded
sample of labelled training cases, the others held out as test cases.

Every step is skipped when its output exists, so a study resumes on the same nnU-Net folders.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_diffusion.datasets.coordinate_channels import (BPRCoordinates, GeometryCoordinates,
                                                           add_coordinates_to_dataset)
from nnunet_diffusion.datasets.phantom import generate_phantom_dataset
from nnunet_diffusion.datasets.staging import staged_dataset
from nnunet_diffusion.plans import (derived_plans_name, load_preset, plan_and_preprocess_with_preset,
                                    preprocess_with_plans_of)

IMAGE_SUFFIX = "_0000.nii.gz"


@dataclass(frozen=True)
class StudyDataset:
    """A dataset by nnU-Net id and name, as nnU-Net's folders name it."""
    dataset_id: int
    name: str

    @property
    def folder(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


@dataclass(frozen=True)
class PhantomStudyDatasets:
    pretrain: StudyDataset  # unlabelled phantoms: the BPR and the backbones are trained on them
    pretrain_coord: StudyDataset  # the same with the BPR's coordinate channels
    probe: StudyDataset  # labelled phantoms: probe training cases and held-out test cases
    probe_coord: StudyDataset  # the same with the BPR's coordinate channels
    probe_true: StudyDataset  # the same with the true coordinates (the image geometry)


@dataclass(frozen=True)
class StudyFolders:
    """nnU-Net's raw and preprocessed folders of a study, the preset its datasets are planned with, and `run`,
    which executes an nnU-Net command as the caller logs it (and raises when it fails)."""
    raw_root: Path
    preprocessed_root: Path
    run: Callable[[list[str]], object]
    preset: str = "cpu_tiny"

    def raw(self, dataset: StudyDataset) -> Path:
        return self.raw_root / dataset.folder

    def preprocessed(self, dataset: StudyDataset) -> Path:
        return self.preprocessed_root / dataset.folder

    def is_planned(self, dataset: StudyDataset) -> bool:
        plans = derived_plans_name("nnUNetPlans", load_preset(self.preset))
        return (self.preprocessed(dataset) / f"{plans}.json").is_file()

    def plan_with_preset(self, dataset: StudyDataset) -> None:
        if not self.is_planned(dataset):
            plan_and_preprocess_with_preset(dataset.dataset_id, self.preset, self.preprocessed_root, self.run)

    def preprocess_with_plans_of(self, source: StudyDataset, target: StudyDataset) -> None:
        if not self.is_planned(target):
            preprocess_with_plans_of(source.dataset_id, target.dataset_id, self.preset, self.preprocessed_root,
                                     self.run)

    def add_coordinates(self, source: StudyDataset, target: StudyDataset, bpr: Path | None) -> None:
        """`add-coordinates`: the BPR's coordinates, or with `bpr` None the true ones from the image geometry."""
        if not (self.raw(target) / "dataset.json").is_file():
            add_coordinates_to_dataset(self.raw(source), self.raw_root, target.dataset_id, target.name,
                                       BPRCoordinates(bpr) if bpr else GeometryCoordinates())


def prepare_phantom(folders: StudyFolders, datasets: PhantomStudyDatasets, pretrain_cases: int, probe_cases: int,
                    test_cases: int, train_bpr: Callable[[StudyDataset], Path]) -> Path:
    """Every phantom dataset, planned, preprocessed and with coordinates; `train_bpr` trains nnUNetTrainerBPR on
    the planned pretraining phantom and returns its checkpoint, which is returned here. The two phantoms are
    generated from different seeds, so no probe phantom was seen in pretraining."""
    if not (folders.raw(datasets.pretrain) / "dataset.json").is_file():
        generate_phantom_dataset(folders.raw_root, datasets.pretrain.dataset_id, datasets.pretrain.name,
                                 pretrain_cases, 0, seed=1)
    if not (folders.raw(datasets.probe) / "dataset.json").is_file():
        generate_phantom_dataset(folders.raw_root, datasets.probe.dataset_id, datasets.probe.name, probe_cases,
                                 test_cases, seed=0)
    folders.plan_with_preset(datasets.pretrain)
    folders.preprocess_with_plans_of(datasets.pretrain, datasets.probe)
    bpr = train_bpr(datasets.pretrain)
    folders.add_coordinates(datasets.pretrain, datasets.pretrain_coord, bpr)
    folders.add_coordinates(datasets.probe, datasets.probe_coord, bpr)
    folders.add_coordinates(datasets.probe, datasets.probe_true, None)
    folders.plan_with_preset(datasets.pretrain_coord)
    folders.preprocess_with_plans_of(datasets.pretrain_coord, datasets.probe_coord)
    folders.preprocess_with_plans_of(datasets.pretrain_coord, datasets.probe_true)
    return bpr


def prepare_hippocampus(folders: StudyFolders, images: StudyDataset, probe: StudyDataset, source: Path,
                        probe_cases: int, seed: int = 0) -> None:
    """`source` (a labelled raw dataset, e.g. the shared msd_hippocampus) linked as the pretraining dataset
    `images`, and `probe`: `probe_cases` of its training cases drawn with `seed` as training cases, the others as
    test cases (links to the source's files); planned, and the probe dataset preprocessed with the images' plans."""
    if not folders.raw(images).exists():
        folders.raw_root.mkdir(parents=True, exist_ok=True)
        folders.raw(images).symlink_to(source.resolve())
    if not (folders.raw(probe) / "dataset.json").is_file():
        _write_probe_split(source, folders.raw(probe), probe.dataset_id, probe_cases, seed)
    folders.plan_with_preset(images)
    folders.preprocess_with_plans_of(images, probe)


def _write_probe_split(source: Path, target: Path, dataset_id: int, probe_cases: int, seed: int) -> None:
    cases = sorted(p.name[:-len(IMAGE_SUFFIX)] for p in (source / "imagesTr").glob(f"*{IMAGE_SUFFIX}"))
    if not 0 < probe_cases < len(cases):
        raise ValueError(f"{source} has {len(cases)} training cases; the probe dataset needs between 1 and "
                         f"{len(cases) - 1} of them as training cases, the rest as test cases, got {probe_cases}")
    chosen = set(np.random.default_rng(seed).choice(cases, probe_cases, replace=False))
    with staged_dataset(target, dataset_id, overwrite=False) as staging:
        for case in cases:
            split = "Tr" if case in chosen else "Ts"
            for folder, name in (("images", f"{case}{IMAGE_SUFFIX}"), ("labels", f"{case}.nii.gz")):
                (staging / f"{folder}{split}").mkdir(exist_ok=True)
                (staging / f"{folder}{split}" / name).symlink_to((source / f"{folder}Tr" / name).resolve())
        dataset_json = json.loads((source / "dataset.json").read_text())
        (staging / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": probe_cases}))
