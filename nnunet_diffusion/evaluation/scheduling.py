"""The units of a comparison as jobs: a training job per unit that needs one, a scoring job (held-out prediction)
that starts when its training has finished, and the finishing step (ensembles, postprocessing, report) once the
scores exist. `local` runs them on this machine, `--jobs` at once, waiting for them; `slurm` submits them
with dependencies and returns (a last job writes the report). Either can be left and re-run at any time: a
job still queued or running is never submitted twice, and `--dry-run` shows each unit's state and the cost of
what a run would submit."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_diffusion.evaluation.comparison import (ARCHIVED, SCORED, TO_PREDICT, TO_RESUME, TO_TRAIN, Comparison,
                                                    Prepared, finish, job_environment)
from nnunet_diffusion.evaluation.jobs import JobRecord, TrainingJob, cancel, read_job, submit
from nnunet_diffusion.evaluation.options import ExecutionOptions
from nnunet_diffusion.evaluation.study import Unit
from nnunet_diffusion.evaluation.unit_scoring import ComparisonError
from nnunet_diffusion.training import progress
from nnunet_diffusion.utils import markdown_table

TRAIN, SCORE, FINISH = "train", "score", "finish"
POLL_SECONDS = 5.0
MAX_ATTEMPTS = 3  # a job that dies this often without a result is a failure, not an interruption


@dataclass(frozen=True)
class ScoringJob:
    """The held-out prediction and scoring of one trained unit."""
    comparison: Comparison
    unit: Unit

    def __call__(self) -> None:
        self.comparison.prepare().score(self.unit)

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True)
class FinishingJob:
    """Ensembles, postprocessing and the report, after the scoring jobs."""
    comparison: Comparison

    def __call__(self) -> None:
        finish(self.comparison.prepare())


def _jobs_folder(prepared: Prepared, unit: Unit | None) -> Path:
    study = prepared.study
    return (study.output if unit is None else study.unit_output(unit)) / "jobs"


def alive_job(prepared: Prepared, unit: Unit | None, kind: str) -> JobRecord | None:
    record = read_job(_jobs_folder(prepared, unit), kind)
    return record if record is not None and record.alive() else None


def _submit_unit(prepared: Prepared, options: ExecutionOptions, unit: Unit, kind: str, gpu: int | None = None,
                 after: str | None = None) -> JobRecord:
    study = prepared.study
    job = TrainingJob(study.training_run(unit, options.save_every)) if kind == TRAIN else \
        ScoringJob(prepared.comparison, unit)
    record = submit(options, _jobs_folder(prepared, unit), kind, job, f"{kind}_{unit.trainer}_r{unit.repeat}_f"
                    f"{unit.fold}", job_environment(study, unit), gpu, None if after is None else f"afterok:{after}")
    print(f"submitted {kind} {unit}: {options.executor} job {record.job_id}"
          + (f" on GPU {gpu}" if gpu is not None else "") + (f" after job {after}" if after else ""), flush=True)
    return record


def starts_from(prepared: Prepared, unit: Unit) -> Unit | None:
    """The unit whose finished model a trainer starts from (the fine-tuning trainers' `source_trainer`, e.g. the
    fold's nnUNetTrainer), when the study trains it: its training must end before this one begins."""
    from nnunet_diffusion.trainer_lookup import trainer_class
    source = getattr(trainer_class(unit.trainer), "source_trainer", None)
    units = prepared.study.units()
    return next((u for u in (Unit(source, unit.repeat, unit.fold), Unit(source, 0, unit.fold)) if u in units), None)


def _source_trained(prepared: Prepared, unit: Unit) -> bool:
    source = starts_from(prepared, unit)
    return source is None or prepared.status(source) not in (TO_TRAIN, TO_RESUME)


def _failed(record: JobRecord, unit: Unit, kind: str) -> None:
    outcome = record.outcome()
    if outcome is not None and outcome[0] != "success":
        raise ComparisonError(f"the {kind} job of {unit} failed; see {record.log}:\n{outcome[1][-2000:]}")


def run_local(prepared: Prepared, options: ExecutionOptions) -> dict:
    """Up to `options.jobs` jobs at once on this machine, each on its own GPU when `options.gpus` names them;
    trainings before the scoring that needs them; returns when every unit is scored, then finishes."""
    if prepared.study.evaluation.device.startswith("cuda") and not options.gpus:
        raise ValueError("--executor local with -device cuda needs --gpus, one GPU per job (e.g. --jobs 2 --gpus 0 1): "
                         "a local job sees only the GPU it is given")
    ours: dict[tuple[Unit, str], JobRecord] = {}
    attempts: dict[tuple[Unit, str], int] = {}
    while True:
        busy = {(unit, kind): record for unit in prepared.study.units() for kind in (TRAIN, SCORE)
                if (record := alive_job(prepared, unit, kind)) is not None}
        for key, record in ours.items():
            if key not in busy:
                _failed(record, *key)
        free_gpus = [g for g in options.gpus if g not in {r.gpu for r in busy.values()}]
        slots = options.jobs - len(busy)
        waiting = False
        needs = {unit: {TO_TRAIN: TRAIN, TO_RESUME: TRAIN, TO_PREDICT: SCORE}.get(prepared.status(unit))
                 for unit in prepared.study.units()}
        for kind in (TRAIN, SCORE):  # trainings first: they are the long jobs
            for unit in (u for u, needed in needs.items() if needed == kind):
                waiting = True
                if (unit, TRAIN) in busy or (unit, SCORE) in busy or slots <= 0 or \
                        (kind == TRAIN and not _source_trained(prepared, unit)):
                    continue
                attempts[unit, kind] = attempts.get((unit, kind), 0) + 1
                if attempts[unit, kind] > MAX_ATTEMPTS:
                    raise ComparisonError(f"the {kind} job of {unit} ended {MAX_ATTEMPTS} times without finishing; "
                                          f"see {_jobs_folder(prepared, unit)}")
                gpu = free_gpus.pop(0) if options.gpus else None
                ours[unit, kind] = busy[unit, kind] = _submit_unit(prepared, options, unit, kind, gpu)
                slots -= 1
        waiting = waiting or bool(busy)
        if not waiting:
            return finish(prepared)
        time.sleep(POLL_SECONDS)


def submit_slurm(prepared: Prepared, options: ExecutionOptions) -> list[JobRecord]:
    """Submit what is neither finished nor queued or running: trainings (after the training a fine-tuning
    trainer starts from), scorings after their trainings, and (unless this command waits and finishes itself) a
    finishing job after every scoring; returns the jobs submitted."""
    submitted, scoring, trainings = [], [], {}
    for unit in prepared.study.units():
        status = prepared.status(unit)
        if status in (SCORED, ARCHIVED):
            continue
        training, score = alive_job(prepared, unit, TRAIN), alive_job(prepared, unit, SCORE)
        if training is None and status in (TO_TRAIN, TO_RESUME):
            source = trainings.get(starts_from(prepared, unit))
            training = _submit_unit(prepared, options, unit, TRAIN, after=source.job_id if source else None)
            submitted.append(training)
            if score is not None:  # it waits on the training that stopped: Slurm would never start it
                cancel(score)
                score = None
        if training is not None:
            trainings[unit] = training
        if score is None:
            score = _submit_unit(prepared, options, unit, SCORE, after=training.job_id if training else None)
            submitted.append(score)
        scoring.append(score.job_id)
    earlier = alive_job(prepared, None, FINISH)
    if earlier is not None and (submitted or options.wait):  # it waits on scorings that were replaced
        cancel(earlier)
        earlier = None
    if not options.wait and (submitted or (scoring and earlier is None)):
        finishing = submit(options, _jobs_folder(prepared, None), FINISH, FinishingJob(prepared.comparison),
                           "finish_report", {}, dependency=f"afterany:{':'.join(scoring)}" if scoring else None,
                           uses_gpu=False)
        submitted.append(finishing)
        print(f"submitted the report: slurm job {finishing.job_id}", flush=True)
    return submitted


def jobs_alive(prepared: Prepared) -> bool:
    return any(alive_job(prepared, unit, kind) for unit in prepared.study.units() for kind in (TRAIN, SCORE))


def wait_for_slurm(prepared: Prepared) -> dict:
    """Wait until no job of the comparison is queued or running, then finish here."""
    while jobs_alive(prepared):
        time.sleep(POLL_SECONDS)
    return finish(prepared)


def _epochs(prepared: Prepared, unit: Unit) -> int:
    from nnunet_diffusion.trainer_lookup import trainer_class
    budget = prepared.study.budget_of(unit.trainer)
    return budget.epochs if budget is not None else getattr(trainer_class(unit.trainer), "training_epochs", None) \
        or 1000


def unit_states(prepared: Prepared, options: ExecutionOptions) -> tuple[list[list[str]], float | None, int]:
    """One row per unit (state, progress, the job a run would submit) and the GPU-hours and number of the jobs
    that a run would submit, at the epoch time logged by the study's trainings of each trainer (else stated)."""
    study = prepared.study
    logged = {unit: progress(study.fold_folder(unit)) for unit in study.units()}
    measured = {}
    for unit, (_, seconds) in logged.items():
        measured.setdefault(unit.trainer, []).extend(seconds)
    rows, hours, jobs = [], 0.0, 0
    for unit in study.units():
        status, epochs = prepared.status(unit), _epochs(prepared, unit)
        epoch = logged[unit][0]
        seconds = float(np.mean(measured[unit.trainer])) if measured[unit.trainer] else options.epoch_seconds
        remaining = max(epochs - max(epoch, 0), 0) if status in (TO_TRAIN, TO_RESUME) else 0
        training, scoring = alive_job(prepared, unit, TRAIN), alive_job(prepared, unit, SCORE)
        needs_training = training is None and status in (TO_TRAIN, TO_RESUME)
        if training is not None:
            state = f"training (job {training.job_id}) at epoch {epoch + 1} of {epochs}"
        elif needs_training or scoring is None:
            state = status + (f" (stopped in epoch {epoch + 1} of {epochs})" if status == TO_RESUME else "")
        else:
            state = f"predicting (job {scoring.job_id})"
        left = "" if not remaining or seconds is None else f"{remaining * seconds / 3600:.1f}"
        would = [] if status in (SCORED, ARCHIVED) else \
            ([TRAIN, SCORE] if needs_training else [] if scoring is not None else [SCORE])
        jobs += len(would)
        if training is None and remaining:
            hours = None if seconds is None or hours is None else hours + remaining * seconds / 3600
        rows.append([str(unit), state, f"{seconds:.0f}" if seconds else "", left, " + ".join(would) or "-"])
    return rows, hours, jobs


def print_dry_run(prepared: Prepared, options: ExecutionOptions) -> None:
    rows, hours, jobs = unit_states(prepared, options)
    print(markdown_table(["unit", "state", "epoch (s)", "training GPU-hours left", "would submit"], rows))
    where = {"inline": "one after another here", "local": f"{options.jobs} at once on this machine",
             "slurm": "on Slurm"}[options.executor]
    cost = "unknown (give --epoch-seconds)" if hours is None else f"{hours:.1f} GPU-hours of training"
    print(f"\n{jobs} job(s) to run {where}: {cost}"
          + (f", about {hours / options.jobs:.1f} hours of wall clock at {options.jobs} trainings at once"
             if hours and options.executor != "inline" else ""))


def run_comparison(comparison: Comparison, options: ExecutionOptions) -> dict:
    """What `crossval` and `ablate` do with their options: show the state, rewrite the report, or run (a learning
    curve: each of its comparisons in turn)."""
    if comparison.study.learning_curve:
        from nnunet_diffusion.evaluation.learning_curve import run_learning_curve
        return run_learning_curve(comparison, options)
    prepared = comparison.prepare()
    if options.dry_run:
        print_dry_run(prepared, options)
        return {}
    if options.report_only:
        return finish(prepared)
    if options.executor == "inline":
        from nnunet_diffusion.evaluation.comparison import run_inline
        return run_inline(prepared, options.save_every)
    if options.executor == "local":
        return run_local(prepared, options)
    submitted = submit_slurm(prepared, options)
    if options.wait or not (submitted or jobs_alive(prepared)):  # with nothing left to run, report here
        return wait_for_slurm(prepared)
    print(f"{len(submitted)} job(s) submitted; re-run the command (add --dry-run) to see their state")
    return {}
