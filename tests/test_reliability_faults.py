"""Faults and bad input around the diffusion trainers, each with the message a user sees: NaN losses, a killed
prediction, GPU checkpoints on CPU-only machines, a missing or wrong nnUNet_extTrainer, checkpoints of the wrong
trainer, NaN images and labels that dataset.json does not declare (docs/troubleshooting.md lists the fixes)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.serialization
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_diffusion import doctor
from nnunet_diffusion.trainers.segmentation import STRATEGY_TRAINERS
from nnunet_runs import CONFIGURATION, PLANS, Dataset, model_folder, train_in_process

TRAINER = "nnUNetTrainerDiffRecycle"
TRAINED_FOLD = 3  # this module's folds, apart from those other modules train in
FRESH_FOLD = 4
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trainer(dataset: Dataset, name: str, fold: int = FRESH_FOLD) -> nnUNetTrainer:
    return get_trainer_from_args(str(dataset.dataset_id), CONFIGURATION, fold, name, PLANS, device=CPU)


@pytest.fixture(scope="module")
def initialized(demo_dataset) -> Callable[[str], nnUNetTrainer]:
    """Initialised (untrained) trainers by name, built once per module."""
    trainers: dict[str, nnUNetTrainer] = {}

    def get(name: str) -> nnUNetTrainer:
        if name not in trainers:
            trainers[name] = _trainer(demo_dataset, name)
            trainers[name].initialize()
        return trainers[name]
    return get


@pytest.fixture(scope="module")
def trained_folder(demo_dataset) -> Path:
    """A recycling model folder (plans, dataset.json, fold checkpoint) as nnUNetv2_predict expects it."""
    train_in_process(demo_dataset, TRAINER, iterations=1, fold=TRAINED_FOLD)
    return model_folder(demo_dataset, TRAINER)


def _predictor(folder: Path, fold: int = TRAINED_FOLD) -> nnUNetPredictor:
    predictor = nnUNetPredictor(use_mirroring=False, device=CPU, perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (fold,), "checkpoint_final.pth")
    return predictor


def _save_as_if_written_on_gpu(checkpoint: dict, path: Path) -> None:
    """torch.save records each tensor's device as a location tag; 'cuda:0' is what a GPU training writes."""
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(checkpoint, path)


# --- NaN / inf losses -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer_name", [cls.__name__ for cls in STRATEGY_TRAINERS])
def test_a_nan_voxel_stops_training_naming_epoch_iteration_and_causes(demo_dataset, trainer_name, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(demo_dataset, trainer_name)
    trainer.num_iterations_per_epoch, trainer.num_epochs = 3, 1
    weights_before_nan: dict[str, torch.Tensor] = {}
    make_dataloaders = trainer.get_dataloaders

    def dataloaders_with_a_nan_in_the_second_batch():
        train, validation = make_dataloaders()

        def batches():
            for index in itertools.count(1):
                batch = next(train)
                if index == 2:
                    weights_before_nan.update({k: v.clone() for k, v in trainer.network.state_dict().items()})
                    batch["data"][0, 0, 0, 0, 0] = float("nan")
                yield batch
        return batches(), validation

    monkeypatch.setattr(trainer, "get_dataloaders", dataloaders_with_a_nan_in_the_second_batch)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at epoch 0, iteration 2/3: the "
                                                 r"weights are not updated.*NaN/inf voxels.*--c"):
        trainer.run_training()
    assert all(torch.equal(v, weights_before_nan[k]) for k, v in trainer.network.state_dict().items())


# --- prediction: killed runs, GPU checkpoints -----------------------------------------------------------------------

def test_a_half_written_output_is_redone_by_default_but_kept_by_continue_prediction(demo_dataset, trained_folder,
                                                                                    tmp_path):
    """nnU-Net writes `<case>.nii.gz` in place; a kill during that write leaves a truncated file behind."""
    image = sorted(demo_dataset.test_images.glob("*.nii.gz"))[0]
    (tmp_path / "in").mkdir()
    shutil.copy(image, tmp_path / "in" / image.name)
    output = tmp_path / "out"
    output.mkdir()
    truncated = output / image.name.replace("_0000", "")
    truncated.write_bytes(image.read_bytes()[:64])
    predictor = _predictor(trained_folder)
    predictor.predict_from_files_sequential(str(tmp_path / "in"), str(output), overwrite=False)  # --continue_prediction
    assert truncated.read_bytes() == image.read_bytes()[:64]
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(truncated))
    predictor.predict_from_files_sequential(str(tmp_path / "in"), str(output), overwrite=True)  # the default
    assert sitk.ReadImage(str(truncated)).GetSize() == sitk.ReadImage(str(image)).GetSize()


def test_a_checkpoint_written_on_gpu_loads_for_prediction_on_the_cpu(trained_folder, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    (folder / f"fold_{TRAINED_FOLD}").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(trained_folder / name, folder / name)
    checkpoint = torch.load(trained_folder / f"fold_{TRAINED_FOLD}" / "checkpoint_final.pth", weights_only=False)
    gpu_file = folder / f"fold_{TRAINED_FOLD}" / "checkpoint_final.pth"
    _save_as_if_written_on_gpu(checkpoint, gpu_file)
    if not torch.cuda.is_available():  # the file really is a GPU checkpoint for torch
        with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
            torch.load(gpu_file, weights_only=False)
    load, locations = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: locations.append(kwargs.get("map_location"))
                        or load(*args, **kwargs))
    predictor = _predictor(folder)
    assert locations == [CPU]  # nnU-Net's predictor maps every checkpoint to the CPU first
    loaded = predictor.list_of_parameters[0]
    assert all(torch.equal(loaded[k], v) for k, v in checkpoint["network_weights"].items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine can read GPU checkpoints")
def test_pretrained_weights_from_a_gpu_checkpoint_need_the_documented_cpu_copy(demo_dataset, trained_folder,
                                                                                tmp_path):
    checkpoint = torch.load(trained_folder / f"fold_{TRAINED_FOLD}" / "checkpoint_final.pth", weights_only=False)
    _save_as_if_written_on_gpu(checkpoint, tmp_path / "gpu.pth")
    trainer = _trainer(demo_dataset, TRAINER)
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        maybe_load_checkpoint(trainer, False, False, str(tmp_path / "gpu.pth"))  # nnUNetv2_train -pretrained_weights
    # the fix of docs/troubleshooting.md
    torch.save(torch.load(tmp_path / "gpu.pth", map_location="cpu", weights_only=False), tmp_path / "cpu.pth")
    maybe_load_checkpoint(trainer, False, False, str(tmp_path / "cpu.pth"))
    loaded = trainer.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in checkpoint["network_weights"].items() if ".seg_layers." not in k)


# --- trainer lookup ---------------------------------------------------------------------------------------------------

def test_without_nnunet_ext_trainer_nnunet_fails_and_the_doctor_gives_the_setup_line(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match=f"Could not find requested nnunet trainer {TRAINER} "):
        recursive_find_trainer_class_by_name(TRAINER)
    capsys.readouterr()
    assert doctor.main([]) == 1
    report = capsys.readouterr().out
    assert "nnUNet_extTrainer is not set" in report and f"nnU-Net cannot find {TRAINER}" in report
    assert doctor.SETUP_LINE in report and doctor.SETUP_LINE == 'eval "$(nnunet-diffusion env)"'


def test_nnunet_ext_trainer_pointing_elsewhere_is_diagnosed(monkeypatch, capsys, tmp_path):
    elsewhere = tmp_path / "my_trainers"
    elsewhere.mkdir()
    (elsewhere / "__init__.py").write_text("")
    monkeypatch.setenv("nnUNet_extTrainer", f"{elsewhere}{os.pathsep}{tmp_path / 'missing'}")
    with pytest.raises(RuntimeError, match=f"Could not find requested nnunet trainer {TRAINER} .*{elsewhere}"):
        recursive_find_trainer_class_by_name(TRAINER)
    capsys.readouterr()
    assert doctor.main([]) == 1
    report = capsys.readouterr().out
    assert f"lists {tmp_path / 'missing'}, which is not a folder" in report
    assert "does not list the plugin's shim folder" in report and doctor.SETUP_LINE in report


def test_the_doctor_accepts_the_setup_and_names_a_misspelt_trainer_or_another_nnunet(nnunet_workspace, capsys,
                                                                                     monkeypatch):
    assert doctor.main(["-tr", TRAINER]) == 0
    assert capsys.readouterr().out.startswith(f"ok: nnU-Net finds {TRAINER}")
    assert doctor.main(["-tr", "nnUNetTrainerDiffRecycel"]) == 1
    assert f"Did you mean {TRAINER}?" in capsys.readouterr().out
    version = doctor.metadata.version
    monkeypatch.setattr(doctor.metadata, "version", lambda name: "2.9.0" if name == "nnunetv2" else version(name))
    assert doctor.main(["-tr", TRAINER]) == 1
    assert "nnunetv2 2.9.0 is installed; the plugin needs nnunetv2<2.9,>=2.8. Fix: pip install 'nnunetv2<2.9,>=2.8'" \
        in capsys.readouterr().out


# --- checkpoints of the wrong trainer --------------------------------------------------------------------------------

def test_weights_of_a_diffusion_trainer_and_of_the_stock_trainer_do_not_mix(initialized, tmp_path):
    stock, diffusion = initialized("nnUNetTrainer"), initialized(TRAINER)
    stock.save_checkpoint(str(tmp_path / "stock.pth"))
    diffusion.save_checkpoint(str(tmp_path / "diffusion.pth"))
    # -pretrained_weights: nnU-Net asserts on the first key the target network cannot find
    with pytest.raises(AssertionError, match=r"Key encoder\.stages\.0\.0\.convs\.0\.conv\.weight is missing in the "
                                             r"pretrained model weights"):
        load_pretrained_weights(stock.network, str(tmp_path / "diffusion.pth"))
    with pytest.raises(AssertionError, match=r"Key uses_sigmoid is missing in the pretrained model weights"):
        load_pretrained_weights(diffusion.network, str(tmp_path / "stock.pth"))
    # --c: the diffusion trainer names the trainer to use; the stock trainer fails in torch's strict load
    with pytest.raises(RuntimeError, match=f"written by nnUNetTrainer and does not fit {TRAINER} \\(first "
                                           f"mismatches: missing .*-tr nnUNetTrainer$"):
        diffusion.load_checkpoint(str(tmp_path / "stock.pth"))
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict for PlainConvUNet:\s+Missing key"):
        stock.load_checkpoint(str(tmp_path / "diffusion.pth"))


@pytest.mark.parametrize("trainer", ["nnUNetTrainerRestorePretrain", "nnUNetTrainerBPR"])
def test_every_plugin_family_names_the_trainer_that_wrote_a_checkpoint_that_does_not_fit(initialized, trainer,
                                                                                           tmp_path):
    initialized(TRAINER).save_checkpoint(str(tmp_path / "diffusion.pth"))
    with pytest.raises(RuntimeError, match=f"written by {TRAINER} and does not fit {trainer} .*-tr {TRAINER}$"):
        initialized(trainer).load_checkpoint(str(tmp_path / "diffusion.pth"))


# --- bad images and labels --------------------------------------------------------------------------------------------

def _raw_dataset(folder: Path, file_ending: str, image_value: float = 1.0, label_value: int = 1) -> Path:
    """Two 8³ cases with one label each; `image_value` / `label_value` go into one voxel of the first case."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case in range(2):
        image = np.random.default_rng(case).normal(size=(8, 8, 8)).astype(np.float32)
        labels = np.zeros((8, 8, 8), np.uint8)
        labels[2:5, 2:5, 2:5] = 1
        if case == 0:
            image[1, 1, 1], labels[0, 0, 0] = image_value, label_value
        sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "imagesTr" / f"case{case}_0000{file_ending}"))
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(folder / "labelsTr" / f"case{case}{file_ending}"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "numTraining": 2,
                                                     "labels": {"background": 0, "ball": 1},
                                                     "file_ending": file_ending}))
    return folder


def test_nan_voxels_are_caught_by_nnunets_dataset_check(tmp_path, capfd):
    folder = _raw_dataset(tmp_path / "nan", ".mha", image_value=float("nan"))
    with pytest.raises(RuntimeError, match="Some images have errors"):
        verify_dataset_integrity(str(folder), num_processes=1)  # --verify_dataset_integrity
    assert "Images contain NaN pixel values" in capfd.readouterr().out


def test_simpleitk_reads_nan_and_inf_in_nifti_as_zero(tmp_path):
    """So NaN in a .nii.gz never reaches nnU-Net's checks or our trainers: it silently becomes 0."""
    image = np.ones((4, 4, 4), np.float32)
    image[0, 0, 0], image[1, 1, 1] = float("nan"), float("inf")
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "case_0000.nii.gz"))
    read, _ = SimpleITKIO().read_images([str(tmp_path / "case_0000.nii.gz")])
    assert read[0, 0, 0, 0] == read[0, 1, 1, 1] == 0 and np.isfinite(read).all()


def test_a_nan_image_given_to_the_predictor_is_refused_instead_of_segmented_as_background(trained_folder):
    image = np.random.default_rng(0).normal(size=(1, 32, 32, 32)).astype(np.float32)
    image[0, 0, 0, 0] = float("nan")  # z-score normalisation spreads it to the whole image
    with pytest.raises(ValueError, match="the image holds NaN or inf voxels after nnU-Net's preprocessing"):
        _predictor(trained_folder).predict_single_npy_array(image, {"spacing": [1.0, 1.0, 1.0]})


def test_labels_missing_from_dataset_json_are_caught_by_nnunets_dataset_check(tmp_path, capfd):
    folder = _raw_dataset(tmp_path / "labels", ".nii.gz", label_value=5)
    with pytest.raises(RuntimeError, match="Some segmentation images contained unexpected labels"):
        verify_dataset_integrity(str(folder), num_processes=1)
    assert "Unexpected labels found in file" in capfd.readouterr().out


def test_labels_missing_from_dataset_json_stop_a_diffusion_training_step(initialized):
    """Without --verify_dataset_integrity such a label reaches the trainer's mask encoding."""
    target = torch.zeros((2, 1, 32, 32, 32), dtype=torch.int16)
    target[0, 0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match="target holds label 5 but the network has 3 output channels; check "
                                         "dataset.json 'labels'"):
        initialized(TRAINER).train_step({"data": torch.zeros((2, 1, 32, 32, 32)), "target": target})
