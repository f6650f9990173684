"""In-process prediction with nnU-Net's own predictor, plus the x0 of every sampling step.

Everything nnU-Net does at inference (preprocessing, sliding window with Gaussian weighting, mirroring, fold
averaging, export to the input's geometry) is nnU-Net's code; this module adds per-step outputs: while
`every_step_output` is active, a diffusion network's eval forward returns the x0 logits of *all* K sampling steps
stacked along the channel axis. Sliding-window and mirror averaging are linear per channel, so one prediction pass
gives exactly the K predictions that step k's x0 would give on its own, at the cost of one K-step sampling run
instead of K of them.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_diffusion.core.diffusion_network import DiffusionSegmentationNetwork
from nnunet_diffusion.core.sampling import SamplerSettings
from nnunet_diffusion.evaluation.model_folders import Case, ModelFolder
from nnunet_diffusion.trainer_support import unwrap
from nnunet_diffusion.utils import environment


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


def read_probabilities(npz_file: Path) -> np.ndarray:
    """Probabilities exported by nnU-Net (`--save_probabilities`), shaped (C, *SimpleITK array shape)."""
    with np.load(npz_file) as data:
        return data["probabilities"]
