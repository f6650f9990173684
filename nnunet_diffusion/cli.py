"""`nnunet-diffusion`: the plugin's command line. Each subcommand lives in its own module with a `main(argv)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("nnunet_diffusion.cli", "print the shell line that lets nnU-Net find the plugin's trainers"),
    "doctor": ("nnunet_diffusion.doctor", "check that nnU-Net finds the plugin's trainers and say how to fix what is off"),
    "plans": ("nnunet_diffusion.cli", "write a CPU-sized inheriting configuration from a plans preset"),
    "demo": ("nnunet_diffusion.demo", "generate a dataset, train stock and recycling trainers, predict, print Dice"),
    "evaluate": ("nnunet_diffusion.evaluation.evaluate",
                 "Dice/HD95 of trained models per sampling step, seed and sampler; tables and plots"),
    "ablate": ("nnunet_diffusion.evaluation.ablate",
               "train missing trainers with nnUNetv2_train, evaluate all, ensemble each with nnUNetTrainer"),
    "uncertainty": ("nnunet_diffusion.evaluation.uncertainty_maps",
                    "N diffusion samples per case: mean segmentation + per-voxel uncertainty map"),
    "phantom": ("nnunet_diffusion.datasets.phantom", "write a CT-like torso phantom dataset with organ labels"),
    "images-to-dataset": ("nnunet_diffusion.datasets.unlabeled",
                          "turn a folder of unlabeled images into an nnU-Net dataset for pretraining"),
    "convert-brats": ("nnunet_diffusion.datasets.brats", "convert BraTS 2013 (DeepMedic layout) to an nnU-Net dataset"),
}


def env_main(argv: list[str]) -> int:
    from nnunet_diffusion.environment import export_line
    argparse.ArgumentParser(prog="nnunet-diffusion env", description=COMMANDS["env"][1] +
                            '. Use it as: eval "$(nnunet-diffusion env)"').parse_args(argv)
    print(export_line())
    return 0


def plans_main(argv: list[str]) -> int:
    from nnunet_diffusion.plans import available_presets, write_preset_plans
    parser = argparse.ArgumentParser(prog="nnunet-diffusion plans", description=COMMANDS["plans"][1])
    parser.add_argument("dataset", help="dataset id or name, e.g. 990 or Dataset990_DiffusionDemo")
    parser.add_argument("--preset", default="cpu_tiny", choices=available_presets())
    parser.add_argument("--source-plans", default="nnUNetPlans", help="plans identifier to derive from")
    parser.add_argument("--plans-name", help="identifier of the written plans (default: the source's + the "
                        "preset's suffix, e.g. nnUNetPlansCPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing plans file that conflicts")
    args = parser.parse_args(argv)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed:
        raise SystemExit("nnUNet_preprocessed is not set; export it as for nnUNetv2_train")
    folder = f"{nnUNet_preprocessed}/{maybe_convert_to_dataset_name(args.dataset)}"
    try:
        print(write_preset_plans(folder, args.preset, args.source_plans, args.plans_name, args.force))
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"nnunet-diffusion plans: {error}") from None
    return 0


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
    if module_name == __name__:
        handler = globals()[f"{argv[0].replace('-', '_')}_main"]
    else:
        handler = importlib.import_module(module_name).main
    return handler(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
