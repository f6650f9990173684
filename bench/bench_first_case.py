"""Why the first case of `nnUNetv2_predict` is slower: each model's stock command once with nnU-Net's default
worker processes (-npp 3 -nps 3) and once with -npp 1 -nps 1, per-case network seconds from nnU-Net's own lines.

    python bench/bench_first_case.py --stock RESULTS/…/nnUNetTrainer_1epoch__nnUNetPlansCPU__3d_cpu \\
        --diffusion RESULTS/…/nnUNetTrainerDiffRecycle_1epoch__nnUNetPlansCPU__3d_cpu -i imagesTs
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_predict import Variant, predict_once
from nnunet_diffusion.core.sampling import ENV_SEED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock", type=Path, required=True)
    parser.add_argument("--diffusion", type=Path, required=True)
    parser.add_argument("-i", "--images", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nnunet_diffusion_bench_first_case_") as scratch:
        for name, folder in (("stock", args.stock), ("diffusion", args.diffusion)):
            for processes in (None, 1):
                options = argparse.Namespace(images=args.images, folds=["0"], device=args.device, processes=processes)
                variant = Variant(name, name, True, {ENV_SEED: "0"})
                output = Path(scratch) / f"{name}_{processes or 'default'}"
                wall, _, cases = predict_once(variant, folder, options, output)
                print(f"{name}, -npp/-nps {processes or 'default (3)'}: command {wall:.1f} s, cases "
                      f"{', '.join(f'{c:.2f}' for c in cases)} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
