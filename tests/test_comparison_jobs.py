"""Trainings and predictions of a comparison as jobs, against real parts: two local jobs at once, a training
killed after nnU-Net's checkpoint and resumed by the next run, and a real single-node Slurm (started by
`.ci/start_slurm`) with a job pre-empted (requeued by submitit) and one cancelled by `scancel` and resumed by a
re-run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_diffusion.cli import main as cli_main
from nnunet_diffusion.evaluation.jobs import read_job
from nnunet_diffusion.training import progress, read_record
from nnunet_runs import make_dataset

BUDGET = ["--iterations", "2", "--val-iterations", "1", "--samplers", "ddim", "--steps", "2", "--disable-tta"]
STOCK, RECYCLE = "nnUNetTrainer", "nnUNetTrainerDiffRecycle"


@pytest.fixture(scope="module")
def jobs_dataset(nnunet_workspace):
    return make_dataset(987, "Jobs", num_train=6, num_test=1)


def _crossval(dataset, output: Path, *extra: str) -> list[str]:
    return ["crossval", "-d", str(dataset.dataset_id), "-c", "3d_cpu", "-p", "nnUNetPlansCPU", "-tr", RECYCLE,
            "--num-folds", "2", *BUDGET, "-o", str(output), *extra]


def _fold_folder(output: Path, trainer: str, fold: int) -> Path:
    return output / "results" / "Dataset987_Jobs" / f"{trainer}__nnUNetPlansCPU__3d_cpu" / f"fold_{fold}"


def _span(output: Path, trainer: str, fold: int) -> tuple[float, float]:
    sessions = read_record(_fold_folder(output, trainer, fold))["sessions"]
    return sessions[0]["started"], sessions[-1]["ended"]


def _shape(output: Path) -> tuple[list, list]:
    result = json.loads((output / "results.json").read_text())
    return ([(u["trainer"], u["repeat"], u["fold"]) for u in result["units"]],
            [(d["a"], d["b"], d["sampler"], d["cases"], d["folds"]) for d in result["differences"]])


def test_local_jobs_train_a_folds_units_at_once_and_report_as_an_inline_run(jobs_dataset, tmp_path, capsys):
    inline, local = tmp_path / "inline", tmp_path / "local"
    arguments = ["-f", "0", "1", "--epochs", "1"]
    assert cli_main(_crossval(jobs_dataset, inline, *arguments)) == 0
    assert cli_main(_crossval(jobs_dataset, local, *arguments, "--executor", "local", "--jobs", "2")) == 0
    assert _shape(local) == _shape(inline) and len(_shape(local)[0]) == 4
    spans = {(t, f): _span(local, t, f) for f in (0, 1) for t in (STOCK, RECYCLE)}
    origin = min(start for start, _ in spans.values())
    print("\n".join(f"{t} fold {f}: trained {start - origin:.0f}-{end - origin:.0f} s"
                    for (t, f), (start, end) in spans.items()))
    at_once = [sum(start <= moment < end for start, end in spans.values()) for moment, _ in spans.values()]
    assert max(at_once) == 2  # --jobs 2: two trainings at once (fold 0's, submitted together), never more
    for fold in (0, 1):
        job = read_job(local / "units" / STOCK / "repeat_0" / f"fold_{fold}" / "jobs", "train")
        assert job.executor == "local" and Path(job.folder, f"{job.job_id}_0_log.out").is_file()
    capsys.readouterr()
    assert cli_main(_crossval(jobs_dataset, local, *arguments, "--executor", "local", "--jobs", "2")) == 0
    assert "submitted" not in capsys.readouterr().out  # a re-run of a finished comparison submits nothing


def test_a_training_killed_after_a_checkpoint_resumes_from_it_on_the_next_run(jobs_dataset, tmp_path):
    output = tmp_path / "cv"
    arguments = _crossval(jobs_dataset, output, "-f", "0", "--epochs", "8", "--save-every", "2",
                          "--baseline", STOCK, "-tr", STOCK)
    folder = _fold_folder(output, STOCK, 0)
    process = subprocess.Popen([sys.executable, "-m", "nnunet_diffusion.cli", *arguments], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from nnunet_diffusion.checkpoints import load_checkpoint
    deadline, saved_epoch = time.time() + 300, None
    while saved_epoch is None and time.time() < deadline:  # the first checkpoint, once nnU-Net has written it whole
        try:
            saved_epoch = load_checkpoint(folder / "checkpoint_latest.pth")["current_epoch"]
        except (FileNotFoundError, RuntimeError, EOFError):
            time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert saved_epoch is not None and not (folder / "checkpoint_final.pth").is_file()
    killed_at, _ = progress(folder)
    assert cli_main(arguments) == 0
    record = read_record(folder)
    assert [s["action"] for s in record["sessions"]] == ["train", "resume"]
    logs = sorted(folder.glob("training_log_*.txt"))
    resumed_epochs = [int(m.group(1)) for m in re.finditer(r": Epoch (\d+)\s*$", logs[-1].read_text(), re.M)]
    assert resumed_epochs == list(range(saved_epoch, 8))  # the count continues where the checkpoint stood
    assert saved_epoch == 2 and killed_at >= 1  # killed after the checkpoint of epochs 0-1 was written
    print(f"killed at epoch {killed_at}, checkpoint at epoch {saved_epoch}, resumed epochs {resumed_epochs}")


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mixed", "allocated"))


slurm = pytest.mark.skipif(not _slurm_answers(), reason="no Slurm controller answers here (as root, "
                           "`.ci/start_slurm` starts a single-node one)")


def _slurm_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _wait_until(condition, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(1)


@slurm
def test_slurm_jobs_resume_after_pre_emption_and_scancel_and_the_report_is_written(jobs_dataset, tmp_path, capsys):
    output = tmp_path / "cv"
    arguments = _crossval(jobs_dataset, output, "-f", "0", "--epochs", "30", "--save-every", "1", "--executor",
                          "slurm", "--slurm-mem", "2G", "--slurm-cpus", "1")
    assert cli_main(arguments) == 0
    jobs = {t: output / "units" / t / "repeat_0" / "fold_0" / "jobs" for t in (STOCK, RECYCLE)}
    folders = {t: _fold_folder(output, t, 0) for t in (STOCK, RECYCLE)}
    first = {t: read_job(jobs[t], "train") for t in (STOCK, RECYCLE)}
    assert first[STOCK].executor == "slurm" and read_job(jobs[STOCK], "score") is not None
    _wait_until(lambda: (folders[STOCK] / "checkpoint_latest.pth").is_file())
    subprocess.run(["scancel", first[STOCK].job_id], check=True)  # cancelled: gone until the command runs again
    _wait_until(lambda: (folders[RECYCLE] / "checkpoint_latest.pth").is_file())
    # pre-emption: Slurm's warning signal makes submitit requeue the same job, which resumes
    subprocess.run(["scancel", "--signal=USR2", first[RECYCLE].job_id], check=True)
    _wait_until(lambda: _slurm_state(first[RECYCLE].job_id) == "PENDING")
    # Slurm holds a requeued job back for a while; as an operator would, let it start now
    subprocess.run(["scontrol", "update", f"JobId={first[RECYCLE].job_id}", "StartTime=now"], check=True)
    _wait_until(lambda: not first[STOCK].alive())
    capsys.readouterr()
    assert cli_main([*arguments, "--dry-run"]) == 0
    assert "to resume (stopped in epoch" in capsys.readouterr().out
    assert cli_main([*arguments, "--wait"]) == 0
    second = read_job(jobs[STOCK], "train")
    assert second.job_id != first[STOCK].job_id and read_job(jobs[RECYCLE], "train") == first[RECYCLE]
    for trainer in (STOCK, RECYCLE):
        assert [s["action"] for s in read_record(folders[trainer])["sessions"]] == ["train", "resume"]
    result = json.loads((output / "results.json").read_text())
    assert sorted(u["trainer"] for u in result["units"]) == [STOCK, RECYCLE] and not result["missing"]
    assert Path(second.folder, f"{second.job_id}_0_log.out").is_file()
