"""Every base segmentation trainer: found by nnU-Net, trained by nnU-Net's loop, predicted by the stock
nnUNetv2_predict (its entry point, in this process; tests/test_learning_and_prediction.py runs the command itself).
The short-schedule copies differ from their base in the epoch count only, which is checked without training."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_diffusion.datasets.synthetic import LABELS
from nnunet_diffusion.evaluation.metrics import evaluate_folder
from nnunet_diffusion.trainers import __all__ as TRAINER_NAMES
from nnunet_diffusion.trainers.segmentation import SEGMENTATION_TRAINERS
from nnunet_diffusion.trainers.training_length import SHORT_SCHEDULE_TRAINERS
from nnunet_runs import predict_in_this_process, train_in_process

NNUNET_DEFAULT_EPOCHS = 1000


def test_nnunets_own_lookup_finds_every_trainer_through_the_shim_folder(nnunet_workspace):
    script = ("import json; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
              f"print(json.dumps({{n: f(n).__module__ for n in {TRAINER_NAMES!r}}}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(modules) == set(TRAINER_NAMES)
    assert all(m.startswith("nnunet_diffusion.") for m in modules.values())  # real classes, not the shims


def test_trainer_names_are_safe_for_nnunet_folder_names():
    assert all("__" not in name for name in TRAINER_NAMES)


def _nnunet_init_without_plans(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                               device: torch.device = torch.device("cuda")) -> None:
    """Stands in for nnUNetTrainer.__init__: only what the plugin's __init__ chain reads, nnU-Net's epoch count
    included, without plans, dataset or folders."""
    self.num_epochs, self.initial_lr, self.is_cascaded = NNUNET_DEFAULT_EPOCHS, 1e-2, False
    self.label_manager = SimpleNamespace(num_segmentation_heads=3, has_regions=False, ignore_label=None)


@pytest.mark.parametrize("trainer_class", SHORT_SCHEDULE_TRAINERS, ids=lambda c: c.__name__)
def test_every_short_schedule_copy_trains_the_epochs_its_name_states_and_changes_nothing_else(trainer_class,
                                                                                             monkeypatch):
    base_name, epochs = re.fullmatch(r"(nnUNetTrainer\w+)_(\d+)epochs?", trainer_class.__name__).groups()
    assert trainer_class.__name__.endswith("_1epoch" if epochs == "1" else "epochs")
    assert [base.__name__ for base in trainer_class.__bases__] == [base_name]
    assert {name for name in vars(trainer_class) if not name.startswith("__")} == {"training_epochs"}
    monkeypatch.setattr(nnUNetTrainer, "__init__", _nnunet_init_without_plans)
    trainer = trainer_class({}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert trainer.num_epochs == int(epochs)


def _agrees_with_nnunets_own_metrics(dataset, predictions: Path) -> None:
    """Dice per case and label of the plugin's evaluation equals what nnU-Net's evaluation (the per-case entries
    of its summary.json) computes from the same files: the exported predictions have the reference's geometry and
    labels, and the numbers the tests and commands report are nnU-Net's."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    labels = [value for value in LABELS.values() if value]
    ours = evaluate_folder(predictions, dataset.test_labels, labels)["metric_per_case"]
    assert len(ours) == len(list(dataset.test_labels.glob("*.nii.gz")))
    for case in ours:
        nnunets = compute_metrics(case["reference_file"], case["prediction_file"], SimpleITKIO(), labels)
        assert {str(label): case["metrics"][str(label)]["Dice"] for label in labels} == pytest.approx(
            {str(label): nnunets["metrics"][label]["Dice"] for label in labels}, nan_ok=True)


@pytest.mark.parametrize("trainer_name", [c.__name__ for c in SEGMENTATION_TRAINERS])
def test_trains_and_predicts_with_stock_nnunetv2_predict(demo_dataset, trainer_name, tmp_path, monkeypatch):
    trainer = train_in_process(demo_dataset, trainer_name)
    checkpoint = torch.load(f"{trainer.output_folder}/checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == trainer_name
    logged = json.loads((Path(trainer.output_folder) / "loss_per_timestep.json").read_text())
    assert sum(logged["epochs"][0]["samples"]) == trainer.num_iterations_per_epoch * trainer.batch_size
    if trainer.timestep_sampling == "loss_aware":
        assert checkpoint["timestep_sampler"]["counts"].sum() == sum(logged["epochs"][0]["samples"])
    monkeypatch.setenv("nnUNet_diffusion_steps", "2")  # two sampling steps keep the predictions affordable
    predict_in_this_process(demo_dataset, trainer_name, tmp_path / "pred", extra=["--disable_tta"])
    for image in sorted(demo_dataset.test_images.glob("*.nii.gz")):
        prediction = sitk.ReadImage(str(tmp_path / "pred" / image.name.replace("_0000", "")))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}
    _agrees_with_nnunets_own_metrics(demo_dataset, tmp_path / "pred")
