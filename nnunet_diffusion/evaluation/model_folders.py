"""Trained nnU-Net model folders and test cases, checked before anything is predicted: every error names the
offending folder or file. Shared by `evaluate`, `ablate` and `uncertainty`."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from nnunet_diffusion.utils import geometry_mismatch

MAX_LISTED = 5  # names listed in an error before "and N more"


@dataclass(frozen=True)
class ModelFolder:
    """One `<Trainer>__<plans>__<configuration>` folder as written by nnUNetv2_train."""
    path: Path
    trainer: str
    plans: str
    configuration: str
    dataset_json: dict

    @property
    def dataset(self) -> str:
        """The dataset folder it was trained in (nnUNet_results/<dataset>/<model folder>)."""
        return self.path.parent.name


@dataclass(frozen=True)
class Case:
    """A test case: its image channel files and, when evaluating, its reference segmentation."""
    name: str
    images: tuple[Path, ...]
    reference: Path | None


def read_model_folder(folder: str | Path, folds: Sequence[int | str], checkpoint: str) -> ModelFolder:
    """Parse and check a trained model folder; raises ValueError naming the missing piece."""
    path = Path(folder).resolve()
    if not path.is_dir():
        raise ValueError(f"model folder {folder} does not exist")
    parts = path.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"model folder {path} is not named <Trainer>__<plans>__<configuration> as nnUNetv2_train "
                         f"names its output (e.g. nnUNetTrainer__nnUNetPlans__3d_fullres)")
    for required in ("dataset.json", "plans.json"):
        if not (path / required).is_file():
            raise ValueError(f"model folder {path} lacks {required}; is it a complete nnUNetv2_train output?")
    missing = [str(path / f"fold_{f}" / checkpoint) for f in folds if not (path / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise ValueError(f"missing checkpoint(s): {', '.join(missing)}; train these folds or choose others with -f "
                         f"(or another checkpoint with -chk)")
    return ModelFolder(path, *parts, dataset_json=json.loads((path / "dataset.json").read_text()))


def check_same_task(models: Sequence[ModelFolder]) -> None:
    """All models must segment the same dataset with the same labels, or one table would mix incomparable rows."""
    first = models[0]
    seen: set[Path] = set()
    for model in models:
        if model.path in seen:
            raise ValueError(f"model folder {model.path} is given twice")
        seen.add(model.path)
        if model.dataset != first.dataset:
            raise ValueError(f"model folders of different datasets cannot share one table: {first.path} was trained "
                             f"on {first.dataset}, {model.path} on {model.dataset}")
        for key in ("labels", "regions_class_order", "file_ending"):
            if model.dataset_json.get(key) != first.dataset_json.get(key):
                raise ValueError(f"model folders with different {key} cannot share one table: "
                                 f"{first.path / 'dataset.json'} has {first.dataset_json.get(key)}, "
                                 f"{model.path / 'dataset.json'} has {model.dataset_json.get(key)}")
        if len(model.dataset_json["channel_names"]) != len(first.dataset_json["channel_names"]):
            raise ValueError(f"{first.path} and {model.path} expect different numbers of input channels")


def find_cases(images: str | Path, file_ending: str, num_channels: int,
               reference: str | Path | None = None) -> list[Case]:
    """Cases of an nnU-Net image folder (`<case>_<XXXX><ending>`), each paired with `<reference>/<case><ending>`.

    Images and references must match one to one: a missing reference or image is an error naming the files,
    so that a mean over a subset of cases cannot pass for a mean over all of them.
    """
    images = Path(images)
    if not images.is_dir():
        raise ValueError(f"image folder {images} does not exist")
    suffix = f"_0000{file_ending}"
    names = sorted(p.name[:-len(suffix)] for p in images.iterdir() if p.name.endswith(suffix))
    if not names:
        raise ValueError(f"image folder {images} holds no '*{suffix}' files (nnU-Net's <case>_0000{file_ending} "
                         f"naming, file ending from the model's dataset.json)")
    channel_files = {n: tuple(images / f"{n}_{c:04d}{file_ending}" for c in range(num_channels)) for n in names}
    missing_channels = [str(f) for files in channel_files.values() for f in files if not f.is_file()]
    if missing_channels:
        raise ValueError(f"the model expects {num_channels} input channel(s) per case; missing "
                         f"{_listing(missing_channels)}")
    if reference is None:
        return [Case(n, channel_files[n], None) for n in names]
    reference = Path(reference)
    if not reference.is_dir():
        raise ValueError(f"reference folder {reference} does not exist")
    references = {p.name[:-len(file_ending)] for p in reference.iterdir() if p.name.endswith(file_ending)}
    problems = []
    lacking = [f"{n}{file_ending} (for {channel_files[n][0]})" for n in names if n not in references]
    if lacking:
        problems.append(f"reference folder {reference} lacks {_listing(lacking)}")
    unmatched = [str(reference / f"{n}{file_ending}") for n in sorted(references - set(names))]
    if unmatched:
        problems.append(f"image folder {images} has no {suffix} image for {_listing(unmatched)}")
    if problems:
        raise ValueError("images and references must hold the same cases: " + "; ".join(problems))
    return [Case(n, channel_files[n], reference / f"{n}{file_ending}") for n in names]


def check_reference_geometry(cases: Sequence[Case]) -> None:
    """Compare headers up front: a prediction is written in its image's geometry and must overlay the reference."""
    for case in cases:
        image, ref = _header(case.images[0]), _header(case.reference)
        mismatch = geometry_mismatch(image, ref)
        if mismatch:
            raise ValueError(f"image {case.images[0]} and reference {case.reference} differ in geometry ({mismatch});"
                             f" predictions are written in the image's geometry and would not overlay the reference")


def _header(file: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    reader.ReadImageInformation()
    return reader


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
