"""The plan's view of a comparison without running it: each unit's state from its fold folder and jobs, the
progress read from nnU-Net's logs, the GPU-hours `--dry-run` estimates, and whether a recorded job still runs."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_diffusion.evaluation.comparison import Comparison, Prepared
from nnunet_diffusion.evaluation.jobs import JobRecord, record_file
from nnunet_diffusion.evaluation.options import EvaluationOptions, ExecutionOptions
from nnunet_diffusion.evaluation.scheduling import print_dry_run, unit_states
from nnunet_diffusion.evaluation.study import HeldOut, Study, Unit
from nnunet_diffusion.training import progress
from nnunet_diffusion.utils import TrainingBudget

BUDGET = TrainingBudget(10, 250, 50)


def _log(folder: Path, epochs: int, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(epochs):
        lines += [f"2026-12-07 10:00:0{epoch}.000000: ", f"2026-12-07 10:00:0{epoch}.000000: Epoch {epoch}",
                  f"2026-12-07 10:00:0{epoch}.000000: Current learning rate: 0.01",
                  f"2026-12-07 10:00:0{epoch}.000000: Epoch time: {seconds} s"]
    lines.append(f"2026-12-07 10:00:09.000000: Epoch {epochs}")  # the epoch that was running
    (folder / "training_log_2026_12_7_10_00_00.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def prepared(tmp_path) -> Prepared:
    study = Study("Dataset990_X", "3d_fullres", "nnUNetPlans", ("R",), "S", (0, 1), tmp_path / "out",
                  tmp_path / "results", EvaluationOptions(samplers=("ddim",), seeds=(0,), device="cpu"), BUDGET,
                  diffusion_trainers=frozenset({"R"}))
    held_out = {f: HeldOut(tmp_path / "images", tmp_path / "labels", ("c1", "c2")) for f in (0, 1)}
    return Prepared(Comparison(study, tmp_path / "raw", tmp_path / "preprocessed"), {"file_ending": ".nii.gz"}, {},
                    [], {}, [], held_out)


def test_progress_is_read_from_nnunets_text_logs(tmp_path):
    _log(tmp_path, 3, 12.5)
    assert progress(tmp_path) == (3, [12.5, 12.5, 12.5])
    assert progress(tmp_path / "missing") == (-1, [])


def test_the_dry_run_states_every_unit_and_prices_what_a_run_would_submit(prepared, capsys):
    resumed = prepared.study.fold_folder(Unit("R", 0, 0))
    _log(resumed, 3, 36.0)
    (resumed / "checkpoint_latest.pth").touch()
    (resumed / "training_record.json").write_text(json.dumps({"budget": {"epochs": 10, "iterations": 250,
                                                                         "val_iterations": 50}}))
    rows, hours, jobs = unit_states(prepared, ExecutionOptions(epoch_seconds=72.0))
    states = {row[0]: row[1] for row in rows}
    assert states == {"S repeat 0 fold 0": "to train", "R repeat 0 fold 0": "to resume (stopped in epoch 4 of 10)",
                      "S repeat 0 fold 1": "to train", "R repeat 0 fold 1": "to train"}
    # R: 7 epochs left on fold 0 and 10 on fold 1 at its logged 36 s; S: 2 × 10 epochs at the stated 72 s
    assert hours == pytest.approx((17 * 36 + 20 * 72) / 3600) and jobs == 8
    print_dry_run(prepared, ExecutionOptions(executor="slurm", jobs=4, epoch_seconds=72.0))
    out = capsys.readouterr().out
    assert "8 job(s) to run on Slurm" in out and f"{hours:.1f} GPU-hours" in out
    assert "unknown (give --epoch-seconds)" in _dry_run_without_epoch_time(prepared, capsys)


def _dry_run_without_epoch_time(prepared: Prepared, capsys) -> str:
    print_dry_run(prepared, ExecutionOptions())
    return capsys.readouterr().out


def test_a_running_job_is_not_submitted_again(prepared, tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        jobs = prepared.study.unit_output(Unit("S", 0, 0)) / "jobs"
        jobs.mkdir(parents=True)
        record = JobRecord("train", "local", str(process.pid), str(jobs), None, time.time())
        record_file(jobs, "train").write_text(json.dumps(record.__dict__))
        assert record.alive()
        rows, _, jobs_to_submit = unit_states(prepared, ExecutionOptions(epoch_seconds=1.0))
        assert rows[0][1].startswith(f"training (job {process.pid})") and rows[0][4] == "score"
        assert jobs_to_submit == 7
    finally:
        process.kill()
        process.wait()
    assert not record.alive()
    assert not JobRecord("train", "local", "999999999", str(tmp_path)).alive()


def test_execution_options_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="one GPU per job"):
        ExecutionOptions(executor="local", jobs=4, gpus=(0, 1))
    with pytest.raises(ValueError, match="--save-every"):
        ExecutionOptions(save_every=0)
    with pytest.raises(ValueError, match="exclude each other"):
        ExecutionOptions(dry_run=True, report_only=True)
