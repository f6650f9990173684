"""nnU-Net's postprocessing of a prediction folder as the cross-validation applies it: a stray blob far from the
structure is removed where that raises the Dice, a correct prediction is left alone, and the folder must hold
every case asked for."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.evaluation.postprocessing import postprocess_folder

PLANS = {"image_reader_writer": "SimpleITKIO"}
DATASET_JSON = {"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz", "channel_names": {"0": "MR"}}


def write(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def reference() -> np.ndarray:
    seg = np.zeros((16, 16, 16), dtype=np.uint8)
    seg[2:6, 2:6, 2:6] = 1
    seg[2:6, 6:10, 2:6] = 2
    return seg


def test_a_stray_blob_is_removed_and_a_clean_case_kept(tmp_path):
    references, predictions = tmp_path / "labels", tmp_path / "predictions"
    for case in ("c0", "c1"):
        write(reference(), references / f"{case}.nii.gz")
    stray = reference()
    stray[12:15, 12:15, 12:15] = 1  # far from the structure: only component removal can fix it
    write(stray, predictions / "c0.nii.gz")
    write(reference(), predictions / "c1.nii.gz")
    scores, chosen = postprocess_folder(predictions, ["c0", "c1"], references, PLANS, DATASET_JSON, [1, 2],
                                        tmp_path / "pp")
    assert {Path(s["prediction_file"]).name: s["metrics"]["1"]["Dice"] for s in scores} == {
        "c0.nii.gz": 1.0, "c1.nii.gz": 1.0}
    assert chosen["postprocessing_fns"] and chosen["postprocessed"]["foreground_mean"]["Dice"] == pytest.approx(1.0)
    assert chosen["input_folder"]["foreground_mean"]["Dice"] < 1.0
    assert (predictions / "c0.nii.gz").is_file() and not (predictions / "postprocessed").exists()


def test_a_folder_without_a_requested_case_is_refused(tmp_path):
    write(reference(), tmp_path / "labels" / "c0.nii.gz")
    write(reference(), tmp_path / "predictions" / "c0.nii.gz")
    with pytest.raises(ValueError, match="lacks the predictions of c1; predict them"):
        postprocess_folder(tmp_path / "predictions", ["c0", "c1"], tmp_path / "labels", PLANS, DATASET_JSON, [1, 2],
                           tmp_path / "pp")
    assert not (tmp_path / "pp").exists()
