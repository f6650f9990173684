"""`nnunet-diffusion demo`: the whole workflow on a generated dataset, with nnU-Net's own commands.

Generate a small 3D dataset in nnU-Net's raw layout, plan and preprocess it, derive a CPU-sized configuration,
train the stock `nnUNetTrainer` and `nnUNetTrainerDiffRecycle` briefly with the plugin's training runner (what
`nnUNetv2_train` runs: nnU-Net's trainer lookup and loop), predict the held-out cases with the stock
`nnUNetv2_predict`, and print a Dice table. Everything lives under --workdir.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from nnunet_diffusion.datasets.synthetic import LABELS, generate_synthetic_dataset
from nnunet_diffusion.environment import with_plugin_environment
from nnunet_diffusion.training import TrainingRun, run_arguments
from nnunet_diffusion.utils import markdown_table, model_folder

DATASET_ID = 990
DATASET_NAME = "DiffusionDemo"
PLANS = "nnUNetPlansCPU"
CONFIGURATION = "3d_cpu"
TRAINERS = ("nnUNetTrainer_1epoch", "nnUNetTrainerDiffRecycle_1epoch")
PROGRESS_MARKERS = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "Epoch time", "Mean Validation Dice",
                    "Predicting ", "Done with")


def run_logged(command: list[str], env: dict[str, str], log_file: Path) -> None:
    """Run an nnU-Net command, echo its progress lines, keep the full output in a log file."""
    print("  $ " + " ".join(command), flush=True)
    started, finished = time.time(), threading.Event()

    def heartbeat() -> None:  # nnU-Net prints once per epoch: say that work goes on in between
        while not finished.wait(30):
            print(f"    ... running for {time.time() - started:.0f} s", flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    with open(log_file, "a") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in process.stdout:
                log.write(line)
                if any(marker in line for marker in PROGRESS_MARKERS):
                    print("    " + line.rstrip()[-110:], flush=True)
        finally:
            finished.set()
        if process.wait() != 0:
            raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}; see {log_file}")


def run_demo(workdir: Path, trainers: tuple[str, ...] = TRAINERS, num_train: int = 12, num_test: int = 4,
             seed: int = 0) -> list[dict]:
    """Run the demo in `workdir` and return one row of mean Dice per trainer."""
    from nnunet_diffusion.evaluation.metrics import evaluate_folder
    from nnunet_diffusion.plans import plan_and_preprocess_with_preset

    workdir = workdir.resolve()
    raw, preprocessed, results = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed", workdir / "nnUNet_results"
    for folder in (raw, preprocessed, results):
        folder.mkdir(parents=True, exist_ok=True)
    env = with_plugin_environment()
    env.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed), nnUNet_results=str(results),
               nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "2"), nnUNet_diffusion_seed=str(seed))
    log = workdir / "demo.log"
    started = time.time()

    print(f"[1/5] generating {num_train}+{num_test} synthetic 3D cases in {raw}", flush=True)
    dataset = generate_synthetic_dataset(raw, DATASET_ID, DATASET_NAME, num_train, num_test, shape=(32, 32, 32),
                                         seed=seed, overwrite=True)
    print("[2/5] planning and preprocessing with nnU-Net", flush=True)
    shutil.rmtree(preprocessed / dataset.name, ignore_errors=True)
    plans = plan_and_preprocess_with_preset(DATASET_ID, "cpu_tiny", preprocessed,
                                            lambda command: run_logged(command, env, log))
    print(f"      CPU-sized configuration: {plans}", flush=True)

    rows = []
    for index, trainer in enumerate(trainers, start=1):
        shutil.rmtree(model_folder(results, dataset.name, trainer, PLANS, CONFIGURATION), ignore_errors=True)
        print(f"[3/5] training {trainer} ({index}/{len(trainers)})", flush=True)
        run = TrainingRun(str(DATASET_ID), CONFIGURATION, 0, trainer, PLANS, results=str(results), validate=True)
        run_logged([sys.executable, "-m", "nnunet_diffusion.training", *run_arguments(run)], env, log)
        print(f"[4/5] predicting the held-out cases with {trainer}", flush=True)
        predictions = workdir / "predictions" / trainer
        shutil.rmtree(predictions, ignore_errors=True)
        run_logged(["nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(predictions), "-d",
                    str(DATASET_ID), "-c", CONFIGURATION, "-p", PLANS, "-tr", trainer, "-f", "0", "-device", "cpu",
                    "-npp", "1", "-nps", "1"], env, log)
        summary = evaluate_folder(predictions, dataset / "labelsTs", [v for v in LABELS.values() if v])
        rows.append({"trainer": trainer, **{name: summary["mean"][str(v)]["Dice"] for name, v in LABELS.items() if v},
                     "mean": summary["foreground_mean"]["Dice"]})
    print(f"[5/5] held-out Dice ({num_test} cases, {time.time() - started:.0f} s in all)\n", flush=True)
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    return markdown_table(columns, [[f"{row[c]:.3f}" if isinstance(row[c], float) else row[c] for c in columns]
                                    for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-diffusion demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("nnunet_diffusion_demo"),
                        help="folder for the dataset, preprocessed data, models and predictions")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), help="trainers to compare")
    args = parser.parse_args(argv)
    run_demo(args.workdir, tuple(args.trainers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
