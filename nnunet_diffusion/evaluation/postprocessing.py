"""nnU-Net's postprocessing of a prediction folder, decided and applied as `nnUNetv2_determine_postprocessing`
does it (keep the largest foreground component where that raises the mean Dice and lowers no class, then the
largest component of each class where that raises its Dice), so that a comparison can score models as nnU-Net's
own pipeline delivers them."""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

from nnunet_diffusion.evaluation.metrics import evaluate_folder


def postprocess_folder(predictions: Path, cases: Sequence[str], references: Path, plans: dict, dataset_json: dict,
                       targets: Sequence, output: Path) -> tuple[list[dict], dict]:
    """Decide nnU-Net's postprocessing on the cases' predictions against their references, write the postprocessed
    cases to `output/postprocessed` and score them; returns the per-case scores (evaluate_folder's) and nnU-Net's
    record of what it chose (its postprocessing.json). `output` is rewritten from scratch."""
    ending = dataset_json["file_ending"]
    missing = [c for c in cases if not (predictions / f"{c}{ending}").is_file()]
    if missing:
        raise ValueError(f"{predictions} lacks the predictions of {', '.join(missing)}; predict them before "
                         f"postprocessing")
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for case in cases:
        (output / f"{case}{ending}").symlink_to((predictions / f"{case}{ending}").resolve())
    determine_postprocessing(str(output), str(references), plans, dataset_json, num_processes=1,
                             keep_postprocessed_files=True)
    scores = evaluate_folder(output / "postprocessed", references, targets, ending)["metric_per_case"]
    return scores, json.loads((output / "postprocessing.json").read_text())
