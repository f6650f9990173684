"""The one ensemble helper: two prediction folders averaged per case with nnU-Net's own ensembling."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

ENSEMBLE_TRAINER = "ensemble"  # the trainer column of an ensemble's rows


def ensemble_folders(first: Path, second: Path, cases: Sequence[str], output: Path) -> Path:
    """Average per case the probabilities (.npz) of two prediction folders written with probabilities, with
    nnU-Net's `merge_files` (what `nnUNetv2_ensemble` runs per case), into `output`; the second folder's
    dataset.json and plans.json describe the task. Returns `output`."""
    from nnunetv2.ensembling.ensemble import merge_files
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    dataset_json = json.loads((second / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((second / "plans.json").read_text()))
    reader_writer, label_manager = plans_manager.image_reader_writer_class(), plans_manager.get_label_manager(
        dataset_json)
    output.mkdir(parents=True, exist_ok=True)
    for case in cases:
        merge_files([str(first / f"{case}.npz"), str(second / f"{case}.npz")], str(output / case),
                    dataset_json["file_ending"], reader_writer, label_manager)
    return output
