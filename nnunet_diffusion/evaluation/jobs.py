"""Trainings and predictions as jobs on submitit: a local executor (processes of this machine, each pinned to a
GPU) or Slurm. Each job leaves a record beside its unit (`jobs/<kind>.json`: executor, job id, GPU) next to
submitit's logs, so that a later run of the command sees a job that is still queued or running and does not
submit it twice. A training job that the scheduler stops (time limit, pre-emption) is requeued by submitit
and resumes from nnU-Net's latest checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nnunet_diffusion.environment import EXT_TRAINER_VARIABLE, ext_trainer_value
from nnunet_diffusion.evaluation.options import ExecutionOptions
from nnunet_diffusion.training import TrainingRun, read_record, train
from nnunet_diffusion.utils import environment

LOCAL_TIMEOUT_MINUTES = 60 * 24 * 30  # a local job runs until it ends: no scheduler limit to requeue from
SLURM_REQUEUES = 100  # time limits a training may reach and be requeued from: a 1000-epoch training spans many
SLURM_STATES_ALIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                      "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT")


@dataclass(frozen=True)
class TrainingJob:
    """One training as a submitit job: the runner trains, resumes or skips it."""
    run: TrainingRun

    def __call__(self) -> dict | None:
        os.environ[EXT_TRAINER_VARIABLE] = ext_trainer_value()
        train(self.run, f"nnunet-diffusion job ({os.environ.get('SUBMITIT_EXECUTOR', 'local')}): "
                        f"{self.run.trainer} fold {self.run.fold}")
        return read_record(self.run.fold_folder)

    def checkpoint(self):
        """Called by submitit when the scheduler stops the job: requeue the same training, which resumes from
        nnU-Net's latest checkpoint."""
        import submitit
        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True)
class JobRecord:
    """A submitted job as a later run of the command finds it."""
    kind: str
    executor: str
    job_id: str
    folder: str
    gpu: int | None = None
    submitted: float = 0.0

    def alive(self) -> bool:
        """Queued or running: Slurm's queue says so, or the local process still runs."""
        if self.executor == "slurm":
            result = subprocess.run(["squeue", "-h", "-j", self.job_id, "-o", "%T"], capture_output=True, text=True)
            if result.returncode:  # a job Slurm no longer knows has ended; an unanswered query proves nothing
                return "Invalid job id" not in result.stderr
            return any(s.strip() in SLURM_STATES_ALIVE for s in result.stdout.split())
        stat = Path(f"/proc/{self.job_id}/stat")
        try:
            alive = stat.read_text().split(")")[-1].split()[0] not in ("Z", "X")
            return alive and b"submitit" in Path(f"/proc/{self.job_id}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False

    def outcome(self) -> tuple[str, str] | None:
        """("success", "") or ("error", traceback) once submitit wrote the job's result; None before, or when
        the job was cancelled or killed."""
        from submitit.core.utils import pickle_load
        result = Path(self.folder) / f"{self.job_id}_0_result.pkl"
        if not result.is_file():
            return None
        status, value = pickle_load(result)
        return (status, "" if status == "success" else str(value))

    @property
    def log(self) -> Path:
        return Path(self.folder) / f"{self.job_id}_0_log.err"


def record_file(folder: Path, kind: str) -> Path:
    return folder / f"{kind}.json"


def read_job(folder: Path, kind: str) -> JobRecord | None:
    file = record_file(folder, kind)
    return JobRecord(**json.loads(file.read_text())) if file.is_file() else None


def _executor(options: ExecutionOptions, folder: Path, name: str, gpu: int | None, dependency: str | None,
              uses_gpu: bool):
    import submitit
    if options.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MINUTES, gpus_per_node=int(gpu is not None),
                                   visible_gpus=() if gpu is None else (gpu,))
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=SLURM_REQUEUES)
    additional = {"kill-on-invalid-dep": "yes", **dict(options.slurm_params)}
    if dependency is not None:
        additional["dependency"] = dependency
    executor.update_parameters(job_name=name, time=options.slurm_time_minutes,
                               gpus_per_node=(options.slurm_gpus or None) if uses_gpu else None,
                               partition=options.slurm_partition, mem=options.slurm_mem,
                               cpus_per_task=options.slurm_cpus, additional_parameters=additional)
    return executor


def submit(options: ExecutionOptions, folder: Path, kind: str, job: Callable, name: str, env: dict[str, str],
           gpu: int | None = None, dependency: str | None = None, uses_gpu: bool = True) -> JobRecord:
    """Submit `job` with `env` added to this process's environment (what the job's process starts with), on Slurm
    with a `dependency` such as afterok:123; record it in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with environment(**env):
        submitted = _executor(options, folder, name, gpu, dependency, uses_gpu).submit(job)
    record = JobRecord(kind, options.executor, str(submitted.job_id), str(folder), gpu, time.time())
    partial = record_file(folder, kind).with_suffix(".partial")
    partial.write_text(json.dumps(record.__dict__))
    partial.replace(record_file(folder, kind))
    return record


def cancel(record: JobRecord) -> None:
    """End a queued or running job (a Slurm job by `scancel`, a local one by SIGINT, as submitit cancels)."""
    if record.executor == "slurm":
        subprocess.run(["scancel", record.job_id], check=False)
    else:
        try:
            os.kill(int(record.job_id), 2)
        except ProcessLookupError:
            pass
