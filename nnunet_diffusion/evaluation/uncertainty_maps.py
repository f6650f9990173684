"""`nnunet-diffusion uncertainty`: N diffusion samples per case → mean segmentation and a per-voxel uncertainty map.

Each sample is nnU-Net's own prediction with its own sampler seed, exported with `--save_probabilities`. The
segmentation of the mean probabilities is written by nnU-Net's ensembling (`merge_files`, what
`nnUNetv2_ensemble` runs per case) as `<case><ending>`; next to it the map (`entropy`: entropy of the mean
probabilities; `variance`: per-class variance across samples, averaged over classes) as
`<case>_<measure><ending>`, a float image in the input image's geometry.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_diffusion.core.sampling import ENV_SAMPLER, ENV_STEPS, SamplerSettings
from nnunet_diffusion.core.scheduler import SAMPLERS
from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value
from nnunet_diffusion.evaluation.sampling_runs import (diffusion_network, export, find_cases,
                                                       load_predictor, preprocess, read_model_folder,
                                                       read_probabilities)
from nnunet_diffusion.evaluation.uncertainty import entropy_of_mean, variance_across_samples, write_map_like

MEASURES = {"entropy": entropy_of_mean, "variance": variance_across_samples}


def predict_uncertainty(model_folder: str | Path, images: str | Path, output: str | Path, seeds: Sequence[int],
                        measure: str = "entropy", folds: Sequence[int | str] = (0,),
                        checkpoint: str = "checkpoint_final.pth", device: str = "cuda", use_mirroring: bool = True,
                        sampler: str | None = None, steps: int | None = None, keep_samples: bool = False,
                        save_probabilities: bool = False) -> list[Path]:
    """Write the mean segmentation and the uncertainty map of every case; returns the maps.

    `sampler` and `steps` left at None keep whatever nnUNet_diffusion_sampler/steps say (as for
    nnUNetv2_predict). Samples go to `<output>/samples/seed_<s>/` when kept, else to a temporary folder.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose {' or '.join(MEASURES)}")
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError(f"need at least 2 distinct seeds (one sample each), got {list(seeds)}")
    model = read_model_folder(model_folder, folds, checkpoint)
    predictor = load_predictor(model, folds, checkpoint, torch.device(device), use_mirroring)
    network = diffusion_network(predictor)
    if network is None:
        raise ValueError(f"{model.path} was trained with {model.trainer}, not a diffusion trainer: its predictions "
                         f"do not depend on the seed, so samples would all be equal")
    if measure == "entropy" and predictor.label_manager.has_regions:
        raise ValueError(f"{model.path} predicts overlapping regions (sigmoid per region), for which the entropy over "
                         f"classes is undefined; use --measure variance")
    reader_writer = predictor.plans_manager.image_reader_writer_class
    if not issubclass(reader_writer, SimpleITKIO):
        raise ValueError(f"{model.path} reads images with {reader_writer.__name__}; uncertainty maps are written in "
                         f"SimpleITK's array order and need a SimpleITKIO model")
    ending = model.dataset_json["file_ending"]
    cases = find_cases(images, ending, len(model.dataset_json["channel_names"]))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    chosen = SamplerSettings.from_environment(network.num_timesteps)
    chosen = replace(chosen, **{k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None})
    maps = []
    with tempfile.TemporaryDirectory(prefix="nnunet_diffusion_samples_") as scratch:
        samples = output / "samples" if keep_samples else Path(scratch)
        for i, case in enumerate(cases, 1):
            data, properties = preprocess(predictor, case)
            probability_files = []
            for j, seed in enumerate(seeds, 1):
                print(f"case {i}/{len(cases)} {case.name}: sample {j}/{len(seeds)} (seed {seed})", flush=True)
                with network.sampling_with(replace(chosen, seed=seed)):
                    logits = predictor.predict_logits_from_preprocessed_data(data)
                truncated = samples / f"seed_{seed}" / case.name
                export(predictor, logits, properties, truncated, save_probabilities=True)
                probability_files.append(truncated.with_name(case.name + ".npz"))
            merge_files([str(f) for f in probability_files], str(output / case.name), ending, reader_writer(),
                        predictor.label_manager, save_probabilities)
            values = MEASURES[measure](np.stack([read_probabilities(f) for f in probability_files]))
            maps.append(write_map_like(values, case.images[0], output / f"{case.name}_{measure}{ending}"))
    return maps


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion uncertainty", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="trained model folder, <Trainer>__<plans>__<config>")
    parser.add_argument("-i", "--images", required=True, help="images, nnU-Net naming (<case>_0000.nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="folder for segmentations and maps")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="one sample per seed (at least 2; default: 0 1 2 3 4)")
    parser.add_argument("--measure", choices=sorted(MEASURES), default="entropy",
                        help="entropy of the mean probabilities (total uncertainty) or variance across samples "
                             "(disagreement only); default: entropy")
    parser.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds, logits averaged (default: 0)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--sampler", choices=SAMPLERS, help=f"default: ${ENV_SAMPLER}, else ddim")
    parser.add_argument("--steps", type=int, help=f"sampling steps (default: ${ENV_STEPS}, else the training T)")
    parser.add_argument("-device", "--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--disable-tta", "--disable_tta", action="store_true", help="no mirroring at test time")
    parser.add_argument("--keep-samples", action="store_true",
                        help="keep every sample's segmentation and probabilities under <output>/samples/")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write the mean probabilities (<case>.npz/.pkl), as nnUNetv2_ensemble does")
    args = parser.parse_args(argv)
    os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()  # so that the in-process predictor finds our trainers
    try:
        maps = predict_uncertainty(args.model, args.images, args.output, args.seeds, args.measure,
                                   [f if f == "all" else int(f) for f in args.folds], args.checkpoint, args.device,
                                   not args.disable_tta, args.sampler, args.steps, args.keep_samples,
                                   args.save_probabilities)
    except ValueError as error:
        raise SystemExit(f"nnunet-diffusion uncertainty: {error}") from None
    print(f"wrote {len(maps)} segmentation(s) and {args.measure} map(s) to {args.output}")
    return 0
