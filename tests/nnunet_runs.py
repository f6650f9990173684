"""Test helpers that drive real nnU-Net: planning, in-process training of a named trainer, stock CLI prediction."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nnunet_diffusion.datasets.synthetic import LABELS, generate_synthetic_dataset
from nnunet_diffusion.plans import plan_and_preprocess_with_preset
from nnunet_diffusion.training import TrainingRun, train
from nnunet_diffusion.utils import TrainingBudget, environment, model_folder as results_folder

PLANS = "nnUNetPlansCPU"
CONFIGURATION = "3d_cpu"


@dataclass
class Dataset:
    dataset_id: int
    raw: Path

    @property
    def name(self) -> str:
        return self.raw.name

    @property
    def test_images(self) -> Path:
        return self.raw / "imagesTs"

    @property
    def test_labels(self) -> Path:
        return self.raw / "labelsTs"


def run(command: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def plan_and_preprocess(dataset_id: int) -> None:
    plan_and_preprocess_with_preset(dataset_id, "cpu_tiny", os.environ["nnUNet_preprocessed"], run)


def make_dataset(dataset_id: int, name: str, num_train: int = 8, num_test: int = 2,
                 dataset_json_update: dict | None = None, label_transform=None) -> Dataset:
    """Generate, optionally rewrite labels / dataset.json (regions, ignore label), then plan and preprocess."""
    raw = generate_synthetic_dataset(os.environ["nnUNet_raw"], dataset_id, name, num_train, num_test,
                                     shape=(32, 32, 32), seed=dataset_id)
    if label_transform is not None:
        import SimpleITK as sitk
        for file in sorted(raw.glob("labels*/*.nii.gz")):
            image = sitk.ReadImage(str(file))
            relabelled = sitk.GetImageFromArray(label_transform(sitk.GetArrayFromImage(image)))
            relabelled.CopyInformation(image)
            sitk.WriteImage(relabelled, str(file))
    if dataset_json_update:
        dataset_json = json.loads((raw / "dataset.json").read_text())
        dataset_json.update(dataset_json_update)
        (raw / "dataset.json").write_text(json.dumps(dataset_json))
    plan_and_preprocess(dataset_id)
    return Dataset(dataset_id, raw)


def model_folder(dataset: Dataset, trainer: str) -> Path:
    return results_folder(os.environ["nnUNet_results"], dataset.name, trainer, PLANS, CONFIGURATION)


def train_in_process(dataset: Dataset, trainer_name: str, iterations: int = 2, epochs: int = 1, fold: int = 0,
                     validate: bool = False):
    """Train a trainer found by nnU-Net's own lookup, with nnU-Net's own loop, for a few iterations."""
    shutil.rmtree(model_folder(dataset, trainer_name) / f"fold_{fold}", ignore_errors=True)
    with environment(nnUNet_n_proc_DA="0"):  # single-threaded augmentation: no worker start-up per test
        return train(TrainingRun(str(dataset.dataset_id), CONFIGURATION, fold, trainer_name, PLANS,
                                 TrainingBudget(epochs, iterations, 1), validate=validate))


def _predict_command(dataset: Dataset, trainer: str, output: Path, inputs: Path | None, fold: str,
                     extra: list[str]) -> list[str]:
    """`nnUNetv2_predict` arguments, sequential (no worker pools) to keep tests light."""
    return ["nnUNetv2_predict", "-i", str(inputs or dataset.test_images), "-o", str(output), "-d",
            str(dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", trainer, "-f", fold,
            "-device", "cpu", "-npp", "0", "-nps", "0", *extra]


def predict(dataset: Dataset, trainer: str, output: Path, inputs: Path | None = None, extra: list[str] = (),
            env: dict[str, str] | None = None, fold: str = "0", check: bool = True) -> subprocess.CompletedProcess:
    """The stock `nnUNetv2_predict` command in a new process."""
    return run(_predict_command(dataset, trainer, output, inputs, fold, list(extra)), env=env, check=check)


def predict_in_this_process(dataset: Dataset, trainer: str, output: Path, extra: list[str] = ()) -> None:
    """The stock `nnUNetv2_predict` entry point called here, which saves a new process's start-up per model."""
    from unittest import mock

    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    with mock.patch("sys.argv", _predict_command(dataset, trainer, output, None, "0", list(extra))):
        predict_entry_point()


def mean_dice(dataset: Dataset, predictions: Path, reference: Path | None = None) -> float:
    """Mean foreground Dice of a prediction folder against the test labels, or against another prediction folder."""
    from nnunet_diffusion.evaluation.metrics import evaluate_folder
    return evaluate_folder(predictions, reference or dataset.test_labels, [v for v in LABELS.values() if v]
                           )["foreground_mean"]["Dice"]


def nnunet_case_dice(dataset: Dataset, predictions: Path) -> dict[str, dict[int, float]]:
    """nnU-Net's own Dice per case and label of a prediction folder (its `compute_metrics`, the per-case entries of
    its summary.json), to compare the plugin's tables with."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    labels = [v for v in LABELS.values() if v]
    return {file.name[:-len(".nii.gz")]: {label: metrics["Dice"] for label, metrics in compute_metrics(
                str(dataset.test_labels / file.name), str(file), SimpleITKIO(), labels)["metrics"].items()}
            for file in sorted(predictions.glob("*.nii.gz"))}


def nnunet_mean_dice(dataset: Dataset, predictions: Path) -> float:
    """nnU-Net's own Dice averaged as the plugin's tables average it: over labels per case, then over cases."""
    import numpy as np
    per_case = nnunet_case_dice(dataset, predictions).values()
    return float(np.nanmean([np.nanmean(list(labels.values())) for labels in per_case]))


def train_if_missing(dataset: Dataset, trainer: str) -> Path:
    """A model folder with a finished fold 0, trained for a few iterations unless a previous test left one."""
    if not (model_folder(dataset, trainer) / "fold_0" / "checkpoint_final.pth").is_file():
        train_in_process(dataset, trainer)
    return model_folder(dataset, trainer)
