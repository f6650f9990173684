"""`nnunet-diffusion uncertainty`: N diffusion samples per case → mean segmentation and a per-voxel uncertainty map.

Each sample is nnU-Net's own prediction with its own sampler seed, exported with `--save_probabilities`. The
segmentation of the mean probabilities is written by nnU-Net's ensembling (`merge_files`, what
`nnUNetv2_ensemble` runs per case) as `<case><ending>`; next to it the map (`entropy`: entropy of the mean
probabilities; `variance`: per-class variance across samples, averaged over classes) as
`<case>_<measure><ending>`, a float image in the input image's geometry.
"""
from __future__ import annotations

import argparse

import torch

from nnunet_diffusion.core.sampling import ENV_SAMPLER, ENV_STEPS
from nnunet_diffusion.core.scheduler import SAMPLERS
from nnunet_diffusion.environment import plugin_command
from nnunet_diffusion.evaluation.uncertainty import MEASURES, predict_uncertainty


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
    with plugin_command("uncertainty"):
        maps = predict_uncertainty(args.model, args.images, args.output, args.seeds, args.measure,
                                   [f if f == "all" else int(f) for f in args.folds], args.checkpoint, args.device,
                                   not args.disable_tta, args.sampler, args.steps, args.keep_samples,
                                   args.save_probabilities)
    print(f"wrote {len(maps)} segmentation(s) and {args.measure} map(s) to {args.output}")
    return 0
