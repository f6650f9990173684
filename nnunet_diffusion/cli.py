"""`nnunet-diffusion`: the plugin's command line. Each subcommand is a module with a `main(argv)`, registered in
`COMMANDS`."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("nnunet_diffusion.environment", "print the shell line that lets nnU-Net find the plugin's trainers"),
    "doctor": ("nnunet_diffusion.doctor", "check that nnU-Net finds the plugin's trainers and say how to fix what is off"),
    "plans": ("nnunet_diffusion.plans", "write a CPU-sized inheriting configuration from a plans preset"),
    "demo": ("nnunet_diffusion.demo", "generate a dataset, train stock and recycling trainers, predict, print Dice"),
    "evaluate": ("nnunet_diffusion.evaluation.commands.evaluate",
                 "Dice/HD95 of trained models per sampling step, seed and sampler; tables and plots"),
    "ablate": ("nnunet_diffusion.evaluation.commands.ablate",
               "train what is missing, compare trainers on a test folder, ensemble each with nnUNetTrainer"),
    "crossval": ("nnunet_diffusion.evaluation.commands.crossval",
                 "k-fold cross-validation of trainers: train, score per step, ensemble, paired statistics"),
    "uncertainty": ("nnunet_diffusion.evaluation.commands.uncertainty",
                    "N diffusion samples per case: mean segmentation + per-voxel uncertainty map"),
    "phantom": ("nnunet_diffusion.datasets.phantom", "write a CT-like torso phantom dataset with organ labels"),
    "images-to-dataset": ("nnunet_diffusion.datasets.unlabeled",
                          "turn a folder of unlabeled images into an nnU-Net dataset for pretraining"),
    "convert-brats": ("nnunet_diffusion.datasets.brats", "convert BraTS 2013 (DeepMedic layout) to an nnU-Net dataset"),
    "add-coordinates": ("nnunet_diffusion.datasets.coordinate_channels",
                        "add anatomical coordinate channels (BPR or image geometry) to a dataset or image folder"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: nnunet-diffusion <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<18} {text}")
        known = not argv or argv[0] in ("-h", "--help")
        if not known:
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
        return 0 if known else 2
    module_name, _ = COMMANDS[argv[0]]
    return importlib.import_module(module_name).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
