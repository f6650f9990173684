"""The one training runner of the plugin: what `nnUNetv2_train` (with `--c`) does, with a chosen budget, seed and
checkpoint interval, and a record of how each training ran.

nnU-Net's own trainer lookup and loop train the model. A fold folder that holds nnU-Net's latest checkpoint is
resumed from it, exactly as `nnUNetv2_train --c` resumes; a finished one is left alone; a folder that holds a
training of another budget (or another number of training cases) is refused, so two budgets never mix in one
model. With `train_cases` it trains on that many of the fold's training cases (`training_subsets.py`).
`training_record.json` beside the checkpoint says what ran: budget, seed, training cases, wall clock per session,
host, device, versions, command.
`demo`, `ablate`, `crossval`, the tests and the experiments all train through `train`; as
`python -m nnunet_diffusion.training` it is one training in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nnunet_diffusion.training_subsets import restrict_training_cases
from nnunet_diffusion.utils import TrainingBudget, model_folder

TRAINING_RECORD = "training_record.json"
FINISHED, RESUMABLE, NEW = "finished", "resumable", "new"
_EPOCH_LINE = re.compile(r": Epoch (\d+)\s*$")
_EPOCH_TIME_LINE = re.compile(r"Epoch time: ([0-9.]+) s")


class TrainingError(RuntimeError):
    """A training failed, or its fold folder holds a training that this one must not continue."""


@dataclass(frozen=True)
class TrainingRun:
    """One training: what `nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS` names, plus the budget
    (None: the trainer's own), the seed, nnU-Net's checkpoint interval, the results root (None: $nnUNet_results)
    and the number of the fold's training cases to train on (None: all; the subset is drawn with the seed, 0
    without one)."""
    dataset: str
    configuration: str
    fold: int | str
    trainer: str
    plans: str = "nnUNetPlans"
    budget: TrainingBudget | None = None
    seed: int | None = None
    device: str = "cpu"
    save_every: int | None = None
    pretrained_weights: str | None = None
    results: str | None = None
    npz: bool = False
    validate: bool = False
    train_cases: int | None = None

    @property
    def results_root(self) -> Path:
        root = self.results or os.environ.get("nnUNet_results")
        if not root:
            raise TrainingError("nnUNet_results is not set; export it as for nnUNetv2_train")
        return Path(root)

    @property
    def fold_folder(self) -> Path:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        return model_folder(self.results_root, maybe_convert_to_dataset_name(str(self.dataset)), self.trainer,
                            self.plans, self.configuration) / f"fold_{self.fold}"

    def settings(self) -> dict:
        """The budget and the number of training cases (which must match for a fold folder to be continued or
        reused) and the seed."""
        return {"budget": None if self.budget is None else asdict(self.budget), "seed": self.seed,
                "train_cases": self.train_cases}


def read_record(fold_folder: Path) -> dict | None:
    file = fold_folder / TRAINING_RECORD
    return json.loads(file.read_text()) if file.is_file() else None


def training_state(fold_folder: Path) -> str:
    """FINISHED (checkpoint_final), RESUMABLE (nnU-Net's latest or best checkpoint, as `--c` finds them) or NEW."""
    if (fold_folder / "checkpoint_final.pth").is_file():
        return FINISHED
    if any((fold_folder / name).is_file() for name in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        return RESUMABLE
    return NEW


def check_fold_folder(run: TrainingRun) -> str:
    """The folder's state, after refusing one that holds a training of another budget (with the fix named): the
    folder's name already fixes trainer, plans and configuration. A folder without a record was trained outside
    this runner (e.g. by `nnUNetv2_train`): it counts as trained with the trainer's own budget."""
    state = training_state(run.fold_folder)
    if state == NEW:
        return state
    record = read_record(run.fold_folder) or {}
    held, wanted = record.get("budget"), run.settings()["budget"]
    if held != wanted:
        raise TrainingError(f"{run.fold_folder} holds a training with budget {held or 'of its trainer'}, not the "
                            f"requested {wanted or 'of its trainer'}; give the same budget, another results root, "
                            f"or remove that fold folder")
    held_cases = record.get("train_cases")
    if held_cases != run.train_cases:
        raise TrainingError(f"{run.fold_folder} holds a training on {held_cases or 'all'} of the fold's training "
                            f"cases, not the requested {run.train_cases or 'all'}; give the same number, another "
                            f"results root, or remove that fold folder")
    return state


def progress(fold_folder: Path) -> tuple[int, list[float]]:
    """The last epoch nnU-Net's text logs in the folder began (0-based; -1 before the first) and the logged epoch
    times in seconds: the progress of a training that may be running elsewhere."""
    epoch, seconds = -1, []
    for log in sorted(fold_folder.glob("training_log_*.txt"), key=lambda file: file.stat().st_mtime):
        for line in log.read_text(errors="replace").splitlines():
            if match := _EPOCH_LINE.search(line):
                epoch = int(match.group(1))
            elif match := _EPOCH_TIME_LINE.search(line):
                seconds.append(float(match.group(1)))
    return epoch, seconds


def _versions() -> dict:
    import importlib.metadata

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"host": platform.node(), "device_name": device, "torch": torch.__version__,
            "nnunetv2": importlib.metadata.version("nnunetv2"), "python": platform.python_version()}


def _set_aside_unreadable_checkpoints(fold_folder: Path) -> str:
    """A process stopped while nnU-Net wrote a checkpoint can leave it cut off: such a file is renamed
    `<name>.incomplete`, and `--c` then resumes from the other one. With none readable the training is refused,
    not silently started again."""
    from nnunet_diffusion.checkpoints import load_checkpoint
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth"):
        file = fold_folder / name
        if not file.is_file():
            continue
        try:
            load_checkpoint(file)
        except (RuntimeError, EOFError, OSError) as error:
            print(f"{file} cannot be read ({error}); set aside as {file.name}.incomplete", flush=True)
            file.replace(file.with_name(file.name + ".incomplete"))
    if training_state(fold_folder) == NEW:
        raise TrainingError(f"{fold_folder} holds no readable checkpoint to resume from (see the *.incomplete "
                            f"files); remove the fold folder to train it anew")
    return RESUMABLE


def _write_record(fold_folder: Path, record: dict) -> None:
    fold_folder.mkdir(parents=True, exist_ok=True)
    partial = fold_folder / (TRAINING_RECORD + ".partial")
    partial.write_text(json.dumps(record, indent=1, default=str))
    partial.replace(fold_folder / TRAINING_RECORD)


def train(run: TrainingRun, command: str | None = None):
    """Train, resume or skip `run` as its fold folder says; returns nnU-Net's trainer, or None when the folder
    held a finished training already. Seeds Python, numpy and torch in this process (nnU-Net's augmentation
    workers draw their own seeds)."""
    import numpy as np
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    state = check_fold_folder(run)
    if state == FINISHED:
        return None
    if state == RESUMABLE:
        state = _set_aside_unreadable_checkpoints(run.fold_folder)
    record = read_record(run.fold_folder) if state == RESUMABLE else None
    record = record or {**run.settings(), "trainer": run.trainer, "plans": run.plans,
                        "configuration": run.configuration, "fold": run.fold,
                        "pretrained_weights": run.pretrained_weights, "sessions": []}
    session = {"action": "resume" if state == RESUMABLE else "train", "started": time.time(),
               "command": command or " ".join(sys.argv), "device": run.device, **_versions()}
    record["sessions"].append(session)
    record["command"] = record["sessions"][0]["command"]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True  # as nnUNetv2_train
    if run.seed is not None:
        random.seed(run.seed)
        np.random.seed(run.seed)
        torch.manual_seed(run.seed)
    trainer = get_trainer_from_args(str(run.dataset), run.configuration, run.fold, run.trainer, run.plans,
                                    device=torch.device(run.device))
    if Path(trainer.output_folder).resolve() != run.fold_folder.resolve():
        raise TrainingError(f"nnU-Net trains into {trainer.output_folder}, not {run.fold_folder}: nnU-Net reads "
                            f"nnUNet_results when it is imported, so set it before starting this process")
    if run.budget is not None:
        trainer.num_epochs = run.budget.epochs
        trainer.num_iterations_per_epoch = run.budget.iterations
        trainer.num_val_iterations_per_epoch = run.budget.val_iterations
    if run.save_every is not None:
        trainer.save_every = run.save_every
    if run.train_cases is not None:
        record["train_case_names"] = restrict_training_cases(trainer, run.train_cases, run.seed or 0)
    _write_record(run.fold_folder, record)
    maybe_load_checkpoint(trainer, state != NEW, False, run.pretrained_weights if state == NEW else None)
    trainer.run_training()
    if run.validate:
        trainer.perform_actual_validation(run.npz)
    session["ended"] = time.time()
    record["wall_seconds"] = sum(s["ended"] - s["started"] for s in record["sessions"] if "ended" in s)
    _write_record(run.fold_folder, record)
    return trainer


def training_log(checkpoint_file: str | Path) -> dict:
    """nnU-Net's logger values (losses, pseudo-Dice, epoch timestamps) stored in a checkpoint."""
    from nnunet_diffusion.checkpoints import load_checkpoint
    return load_checkpoint(checkpoint_file)["logging"]


def epoch_seconds(logging: dict) -> list[float]:
    """Wall-clock seconds of every epoch (training and its validation), from nnU-Net's logged timestamps."""
    return [end - start for start, end in zip(logging["epoch_start_timestamps"], logging["epoch_end_timestamps"])]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of one training, as `nnUNetv2_train` names them, plus budget, seed and checkpoint interval."""
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("fold")
    parser.add_argument("trainer")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-device", "--device", default="cpu")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--budget", type=int, nargs=3, metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"))
    parser.add_argument("--save-every", type=int, help="epochs between nnU-Net's checkpoint_latest.pth (50)")
    parser.add_argument("-pretrained_weights", "--pretrained-weights")
    parser.add_argument("--results", help="results root (default: $nnUNet_results)")
    parser.add_argument("--npz", action="store_true", help="with --validate: keep the probabilities")
    parser.add_argument("--validate", action="store_true", help="run nnU-Net's final validation afterwards")
    parser.add_argument("--train-cases", type=int, metavar="N", help="train on N of the fold's training cases, "
                        "drawn with --seed (default: all)")


def run_from_args(args: argparse.Namespace) -> TrainingRun:
    return TrainingRun(args.dataset, args.configuration, args.fold if args.fold == "all" else int(args.fold),
                       args.trainer, args.plans, None if args.budget is None else TrainingBudget(*args.budget),
                       args.seed, args.device, args.save_every, args.pretrained_weights, args.results, args.npz,
                       args.validate, args.train_cases)


def run_arguments(run: TrainingRun) -> list[str]:
    """The command-line arguments that `run_from_args` turns back into `run`."""
    arguments = [str(run.dataset), run.configuration, str(run.fold), run.trainer, "-p", run.plans, "--device",
                 run.device]
    for flag, value in (("--seed", run.seed), ("--save-every", run.save_every),
                        ("--pretrained-weights", run.pretrained_weights), ("--results", run.results),
                        ("--train-cases", run.train_cases)):
        if value is not None:
            arguments += [flag, str(value)]
    if run.budget is not None:
        arguments += ["--budget", str(run.budget.epochs), str(run.budget.iterations), str(run.budget.val_iterations)]
    return arguments + ["--npz"] * run.npz + ["--validate"] * run.validate


def main(argv: list[str] | None = None) -> int:
    """`python -m nnunet_diffusion.training DATASET CONFIGURATION FOLD TRAINER`: train, resume or skip one model."""
    parser = argparse.ArgumentParser(prog="python -m nnunet_diffusion.training", description=main.__doc__)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value
    os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()  # nnU-Net's lookup finds the plugin's trainers
    run = run_from_args(args)
    train(run, " ".join([sys.executable, "-m", "nnunet_diffusion.training", *run_arguments(run)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
