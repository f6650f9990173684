"""Trained nnU-Net model folders, test cases, and in-process prediction with nnU-Net's own predictor.

Shared by `evaluate`, `ablate` and `uncertainty`. Everything nnU-Net does at inference (preprocessing, sliding
window with Gaussian weighting, mirroring, fold averaging, export to the input's geometry) is nnU-Net's code;
this module only adds (1) checks with errors that name the offending folder or file, and (2) per-step outputs:
while `every_step_output` is active, a diffusion network's eval forward returns the x0 logits of *all* K
sampling steps stacked along the channel axis. Sliding-window and mirror averaging are linear per channel, so one
prediction pass gives exactly the K predictions that step k's x0 would give on its own, at the cost of one
K-step sampling run instead of K of them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_diffusion.core.network import DiffusionSegmentationNetwork
from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.utils import environment, geometry_mismatch
from nnunet_diffusion.trainer_support import unwrap

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


class StepPredictor(nnUNetPredictor):
    """nnU-Net's predictor whose sliding-window buffer holds `stacked_steps` × the label heads when asked.

    nnU-Net sizes that buffer from the label manager; during one sliding-window pass the label manager is
    replaced by a view reporting the stacked channel count. Everything else is nnU-Net's own code.
    """
    stacked_steps: int = 1

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):
        label_manager = self.label_manager
        self.label_manager = SimpleNamespace(
            num_segmentation_heads=label_manager.num_segmentation_heads * self.stacked_steps)
        try:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        finally:
            self.label_manager = label_manager


def load_predictor(model: ModelFolder, folds: Sequence[int | str], checkpoint: str, device: torch.device,
                   use_mirroring: bool) -> StepPredictor:
    """An initialised predictor for the folds of one model (their logits are averaged, as by nnUNetv2_predict)."""
    predictor = StepPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                              perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                              allow_tqdm=False)
    # torch.compile would freeze the eval forward that every_step_output swaps; evaluation runs uncompiled.
    with environment(nnUNet_compile=None):
        predictor.initialize_from_trained_model_folder(str(model.path), tuple(folds), checkpoint)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise ValueError(f"{model.path} is a cascaded configuration that needs the predictions of "
                         f"{predictor.configuration_manager.previous_stage_name}; evaluate a full-resolution model")
    return predictor


def diffusion_network(predictor: nnUNetPredictor) -> DiffusionSegmentationNetwork | None:
    """The diffusion network behind a predictor, or None for a stock (one-pass) network."""
    network = unwrap(predictor.network)
    return network if isinstance(network, DiffusionSegmentationNetwork) else None


def preprocess(predictor: nnUNetPredictor, case: Case) -> tuple[torch.Tensor, dict]:
    """nnU-Net's preprocessing of one case (done once, reused for every sampler, seed and step)."""
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case([str(f) for f in case.images], None, predictor.plans_manager,
                                                predictor.configuration_manager, predictor.dataset_json)
    return torch.from_numpy(data), properties


@contextmanager
def every_step_output(predictor: StepPredictor, settings: SamplerSettings) -> Iterator[list[int]]:
    """Make the diffusion network's eval forward return all K steps' x0 logits, stacked along channels.

    Yields a list that receives the number of steps each network call ran (fewer than K when early exit
    stops it; the remaining steps then repeat the last x0, which is the prediction such a run returns).
    """
    network = diffusion_network(predictor)
    if network is None:
        raise ValueError(f"{predictor.trainer_name} is not a diffusion trainer; it has no sampling steps")
    steps_used: list[int] = []

    def forward(image: torch.Tensor) -> torch.Tensor:
        steps = list(network.sample_steps(image, settings))
        steps_used.append(len(steps))
        return torch.cat(steps + [steps[-1]] * (settings.steps - len(steps)), dim=1)

    predictor.network = network
    predictor.stacked_steps = settings.steps
    network.forward = forward  # instance attribute: shadows the class's forward until deleted
    try:
        yield steps_used
    finally:
        del network.forward
        predictor.stacked_steps = 1


def predict_steps(predictor: StepPredictor, data: torch.Tensor,
                  settings: SamplerSettings) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of every sampling step (in the preprocessed geometry) and the steps each network call ran."""
    with every_step_output(predictor, settings) as steps_used:
        logits = predictor.predict_logits_from_preprocessed_data(data)
    return list(logits.chunk(settings.steps, dim=0)), steps_used


def export(predictor: nnUNetPredictor, logits: torch.Tensor, properties: dict, output_truncated: Path,
           save_probabilities: bool = False) -> Path:
    """nnU-Net's export (resampling, uncropping, writing in the input's geometry); returns the segmentation file."""
    output_truncated.parent.mkdir(parents=True, exist_ok=True)
    export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                  predictor.dataset_json, str(output_truncated), save_probabilities)
    return output_truncated.with_name(output_truncated.name + predictor.dataset_json["file_ending"])


def evaluation_targets(label_manager: LabelManager) -> list[int | tuple[int, ...]]:
    """What nnU-Net's own evaluation scores: foreground regions for region-based models, else foreground labels."""
    return list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)


def target_names(dataset_json: dict) -> dict[str, str]:
    """Metric key (`str(label)` or `str(region)`, as in nnU-Net's summary.json) → the label's name."""
    return {str(tuple(value) if isinstance(value, list) else value): name
            for name, value in dataset_json["labels"].items()}


def read_probabilities(npz_file: Path) -> np.ndarray:
    """Probabilities exported by nnU-Net (`--save_probabilities`), shaped (C, *SimpleITK array shape)."""
    with np.load(npz_file) as data:
        return data["probabilities"]


def _header(file: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    reader.ReadImageInformation()
    return reader


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
