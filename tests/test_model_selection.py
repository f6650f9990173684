"""nnU-Net's own model selection over a stock and a diffusion trainer, as docs/choosing.md tells users to choose:
every fold of a small split trained for both trainers and validated by `nnUNetv2_train --val --npz`, then
`nnUNetv2_find_best_configuration` picks a model or the ensemble, and the inference instructions it writes
(`nnUNetv2_predict` per model, `nnUNetv2_ensemble`, `nnUNetv2_apply_postprocessing`) run as written — with
`-device cpu` added, the one change a CPU machine needs — and produce a segmentation of every test image. Where a
single model wins, the instructions nnU-Net writes for the ensemble are run as well, so that both routes are
covered whichever the barely trained models favour."""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_runs import CONFIGURATION, PLANS, make_dataset, model_folder, run, train_in_process

STOCK, FINETUNE = "nnUNetTrainer", "nnUNetTrainerDiffRecycleFinetune"
FOLDS = (0, 1)
PLACEHOLDERS = ("OUTPUT_FOLDER_MODEL_1", "OUTPUT_FOLDER_MODEL_2", "OUTPUT_FOLDER_PP", "OUTPUT_FOLDER", "INPUT_FOLDER")


@pytest.fixture(scope="module")
def two_fold_dataset(nnunet_workspace):
    """A small generated dataset with a two-fold split of its six training cases."""
    dataset = make_dataset(984, "ModelSelection", num_train=6, num_test=2)
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (dataset.raw / "labelsTr").glob("*.nii.gz"))
    splits = [{"train": cases[3:], "val": cases[:3]}, {"train": cases[:3], "val": cases[3:]}]
    (Path(os.environ["nnUNet_preprocessed"]) / dataset.name / "splits_final.json").write_text(json.dumps(splits))
    return dataset


def _validate_with_nnunetv2_train(dataset, trainer: str, fold: int) -> None:
    """`nnUNetv2_train … --val --npz`: the stock entry point, called here to save a process start per model."""
    from unittest import mock

    from nnunetv2.run.run_training import run_training_entry
    with mock.patch("sys.argv", ["nnUNetv2_train", str(dataset.dataset_id), CONFIGURATION, str(fold), "-p", PLANS,
                                 "-tr", trainer, "--val", "--npz", "-device", "cpu"]):
        run_training_entry()


def _as_written(line: str, folders: dict[str, Path]) -> list[str]:
    """One instruction of inference_instructions.txt with its placeholders filled (longest names first)."""
    for placeholder in PLACEHOLDERS:
        line = re.sub(rf"\b{placeholder}\b", str(folders[placeholder]), line)
    command = shlex.split(line)
    return command + ["-device", "cpu"] if command[0] == "nnUNetv2_predict" else command


def test_find_best_configuration_chooses_between_stock_and_recycling_and_its_instructions_run(two_fold_dataset,
                                                                                             tmp_path):
    dataset = two_fold_dataset
    for fold in FOLDS:
        train_in_process(dataset, STOCK, iterations=5, fold=fold)
        train_in_process(dataset, FINETUNE, iterations=5, fold=fold)  # starts from this fold's stock model
        for trainer in (STOCK, FINETUNE):
            _validate_with_nnunetv2_train(dataset, trainer, fold)
            assert list((model_folder(dataset, trainer) / f"fold_{fold}" / "validation").glob("*.npz"))
    run(["nnUNetv2_find_best_configuration", str(dataset.dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-tr", STOCK,
         FINETUNE, "-f", *map(str, FOLDS), "-np", "1"])

    results = Path(os.environ["nnUNet_results"]) / dataset.name
    information = json.loads((results / "inference_information.json").read_text())
    candidates = {f"{STOCK}__{PLANS}__{CONFIGURATION}", f"{FINETUNE}__{PLANS}__{CONFIGURATION}"}
    compared = set(information["all_results"])
    assert candidates < compared and len(compared) == 3  # both models and their ensemble
    chosen = information["best_model_or_ensemble"]["selected_model_or_models"]
    assert {m["trainer"] for m in chosen} <= {STOCK, FINETUNE}
    print(f"nnUNetv2_find_best_configuration chose {[m['trainer'] for m in chosen]}: "
          f"{json.dumps(information['all_results'])}")

    _run_instructions(results / "inference_instructions.txt", len(chosen) == 2, dataset, tmp_path / "chosen")
    if len(chosen) == 1:  # the other route too: the instructions nnU-Net writes when the ensemble wins
        _run_instructions(_ensemble_instructions(dataset, information, tmp_path), True, dataset, tmp_path / "ensemble")


def _ensemble_instructions(dataset, information: dict, tmp_path: Path) -> Path:
    """What find_best_configuration writes when the ensemble wins, by nnU-Net's own functions: the ensemble's
    postprocessing decided on its cross-validation predictions, then `print_inference_instructions`."""
    from nnunetv2.evaluation.find_best_configuration import print_inference_instructions
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing
    name = next(k for k in information["all_results"] if k.startswith("ensemble___"))
    source = Path(os.environ["nnUNet_results"]) / dataset.name / "ensembles" / name
    determine_postprocessing(str(source), str(Path(os.environ["nnUNet_preprocessed"]) / dataset.name /
                                              "gt_segmentations"),
                             plans_file_or_dict=str(source / "plans.json"),
                             dataset_json_file_or_dict=str(source / "dataset.json"), num_processes=1)
    information["best_model_or_ensemble"].update(
        postprocessing_file=str(source / "postprocessing.pkl"), some_plans_file=str(source / "plans.json"),
        selected_model_or_models=[{"configuration": CONFIGURATION, "trainer": t, "plans_identifier": PLANS}
                                  for t in (STOCK, FINETUNE)])
    print_inference_instructions(information, instructions_file=str(tmp_path / "ensemble_instructions.txt"))
    return tmp_path / "ensemble_instructions.txt"


def _run_instructions(instructions: Path, ensemble: bool, dataset, root: Path) -> None:
    """Every command of an inference_instructions.txt, as written; then a segmentation of every test image."""
    folders = {name: root / name.lower() for name in PLACEHOLDERS}
    folders["INPUT_FOLDER"] = dataset.test_images
    lines = [line.strip() for line in instructions.read_text().splitlines() if line.strip().startswith("nnUNetv2_")]
    programs = [line.split()[0] for line in lines]
    assert programs == (["nnUNetv2_predict"] * 2 + ["nnUNetv2_ensemble"] if ensemble
                        else ["nnUNetv2_predict"]) + ["nnUNetv2_apply_postprocessing"]
    for line in lines:
        run(_as_written(line, folders))
    for image in sorted(dataset.test_images.glob("*.nii.gz")):
        segmentation = sitk.ReadImage(str(folders["OUTPUT_FOLDER_PP"] / image.name.replace("_0000", "")))
        assert segmentation.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(segmentation))) <= {0, 1, 2}
