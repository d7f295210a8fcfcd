"""Runs an experiment's runs as SLURM jobs through submitit (``executor.kind: slurm``), or as local
processes through submitit's local executor (``submitit_local``, for testing the same path).

One submission is one job array (``executor.batch()``), so ``slurm_array_parallelism`` bounds how many runs
the scheduler runs at once. The command returns once the array is submitted: each run's job id is kept in its
``status.json`` (state "queued"), ``dynexit status`` asks the scheduler (``sacct``) for the state of those ids,
and a later ``dynexit run`` submits nothing for a run whose job is still queued or running.

A job that reaches its time limit or is preempted is requeued by submitit: the submitted callable is
checkpointable (:class:`RunJob`), and the requeued job resumes the run from its folder's checkpoint.

Resources are derived from the run unless the spec gives them: a run on ``g`` GPUs (``executor.gpus_per_run``)
whose loaders start ``w`` workers per process (``data.num_workers``) gets ``cpus_per_task = g x (w + 1)`` (one
core per loader worker and one for the training process) and ``mem_gb = 8 x cpus_per_task`` (loader workers
each hold a batch pipeline; 8 GB per core is the usual GPU-node ratio). A spec that sets fewer CPUs than its
loaders start is refused. One run is one task on one node.
"""
from __future__ import annotations

import logging
import re
import subprocess
import time

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher

from dynexit.runs.aggregate import aggregate
from dynexit.runs.execute import execute
from dynexit.runs.folders import QUEUED, read_status, run_dir, write_status
from dynexit.runs.spec import Experiment, Run, load_spec

log = logging.getLogger(__name__)

GB_PER_CPU = 8
# Scheduler states of a job that will still run (or is running): its run is not submitted again.
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
               "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "PREEMPTED")


class RunJob(submitit.helpers.Checkpointable):
    """What one job runs: the run (with its own thread count, ``train.threads``), then the experiment's
    aggregate files. On a time limit or preemption submitit calls :meth:`checkpoint` and requeues the
    job; the run then resumes from the last checkpoint in its folder."""

    def __init__(self, spec_path: str, overrides: list[str], results_dir: str, run_id: str):
        self.spec_path, self.overrides, self.results_dir, self.run_id = spec_path, overrides, results_dir, run_id

    def __call__(self):
        import torch

        experiment = load_spec(self.spec_path, self.overrides, self.results_dir)
        n = torch.cuda.device_count()
        gpus = experiment.executor.gpus_per_run
        if n and n < gpus:
            raise RuntimeError(f"run {self.run_id} wants {gpus} GPUs (executor.gpus_per_run), the job sees {n}")
        devices = [f"cuda:{i}" for i in range(gpus)] if n else ["cpu"]
        outcome = execute(experiment, experiment.run(self.run_id), devices)
        aggregate(experiment)
        return outcome

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The same run again: training state lives in the run folder, not in this object."""
        return submitit.helpers.DelayedSubmission(RunJob(self.spec_path, self.overrides, self.results_dir,
                                                         self.run_id))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def job_name(experiment: Experiment, run: Run) -> str:
    """``dynexit-<experiment>-<variant>-s<seed>-<run_id>``: which run a job is, as squeue shows it."""
    return f"dynexit-{_slug(experiment.name)}-{_slug(run.variant)}-s{run.config.seed}-{run.run_id}"


def job_resources(experiment: Experiment, runs: list[Run]) -> dict:
    """``cpus_per_task`` and ``mem_gb`` for the runs' jobs (the module docstring gives the rule); an explicit
    setting smaller than the loaders need is a ValueError naming the key."""
    ex = experiment.executor
    workers = max(r.config.data.num_workers for r in runs)
    gpus = max(1, ex.gpus_per_run)
    need = gpus * (workers + 1)
    cpus = ex.cpus_per_task if ex.cpus_per_task is not None else need
    if cpus < need:
        raise ValueError(f"executor.cpus_per_task={cpus} is too small: {gpus} GPU process(es) x (data.num_workers="
                         f"{workers} loader workers + 1) need {need}; raise it or leave it unset to derive it")
    mem = ex.mem_gb if ex.mem_gb is not None else GB_PER_CPU * cpus
    if mem < 1:
        raise ValueError(f"executor.mem_gb must be at least 1, got {mem}")
    return {"cpus_per_task": int(cpus), "mem_gb": int(mem)}


def make_executor(experiment: Experiment, runs: list[Run]):
    """A submitit executor for the runs (its files under ``<results_dir>/submitit/``)."""
    ex = experiment.executor
    cluster = "local" if ex.kind == "submitit_local" else "slurm"
    executor = submitit.AutoExecutor(folder=experiment.results_dir / "submitit" / "%j", cluster=cluster)
    resources = job_resources(experiment, runs)
    name = job_name(experiment, runs[0]) if len(runs) == 1 else f"dynexit-{_slug(experiment.name)}"
    params = {"timeout_min": ex.timeout_min, "name": name, "cpus_per_task": resources["cpus_per_task"],
              "gpus_per_node": ex.gpus_per_run if cluster == "slurm" else 0}
    if cluster == "slurm":
        params.update(mem_gb=resources["mem_gb"], slurm_array_parallelism=ex.slurm_array_parallelism,
                      tasks_per_node=1, nodes=1)
        if ex.slurm_partition:
            params["slurm_partition"] = ex.slurm_partition
        if ex.slurm_account:
            params["slurm_account"] = ex.slurm_account
    executor.update_parameters(**params)
    return executor


def submit(experiment: Experiment, runs: list[Run], overrides: list[str] | None, progress=None,
           wait: bool = False):
    """Submits the runs as one job array and records each run's job id in its ``status.json``. With
    ``wait``, waits for the jobs and returns their outcomes (``progress``, a ``dynexit.runs.runner.Progress``,
    hears of each); without, returns [] once submitted."""
    if experiment.path is None:
        raise ValueError("SLURM runs need the experiment to come from a spec file")
    executor = make_executor(experiment, runs)
    with executor.batch():
        jobs = [executor.submit(RunJob(str(experiment.path), list(overrides or []), str(experiment.results_dir),
                                       run.run_id)) for run in runs]
    for run, job in zip(runs, jobs):
        folder = run_dir(experiment, run)
        folder.mkdir(parents=True, exist_ok=True)
        write_status(folder, QUEUED, job_id=str(job.job_id), scheduler=experiment.executor.kind,
                     job_name=job_name(experiment, run), submitted=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     variant=run.variant, overrides=run.overrides, error="")
    log.info("submitted %d runs as one job array (%s): %s", len(jobs), experiment.executor.kind,
             ", ".join(f"{r.run_id}={j.job_id}" for r, j in zip(runs[:8], jobs[:8])))
    if not wait:
        return []
    outcomes = []
    for job in jobs:
        outcome = job.result()
        outcomes.append(progress.finished(outcome) if progress is not None else outcome)
    return outcomes


# --------------------------------------------------------------------------- the scheduler's view

def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """The scheduler's state of each job id (one ``sacct`` call; ``UNKNOWN`` for an id it does not list).
    Raises FileNotFoundError when there is no ``sacct`` (not on a SLURM machine)."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    command = ["sacct", "-o", "JobID,State", "--parsable2"]
    for main_id in sorted({j.split("_")[0] for j in ids}):
        command += ["-j", main_id]
    try:
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise FileNotFoundError("sacct not found: the scheduler's state of SLURM jobs needs a SLURM machine") from None
    info = SlurmInfoWatcher().read_info(output)
    # "CANCELLED by 123" -> "CANCELLED"
    return {j: info.get(j, {}).get("State", "UNKNOWN").split(" ")[0] for j in ids}


def live_job_ids(experiment: Experiment, runs: list[Run]) -> dict[str, str]:
    """``{run_id: job_id}`` for the runs whose SLURM job will still run or is running (a job the scheduler
    reports as finished, failed, timed out, cancelled or does not know is not live)."""
    if experiment.executor.kind != "slurm":
        return {}
    recorded = {r.run_id: read_status(run_dir(experiment, r)).get("job_id") for r in runs}
    recorded = {k: v for k, v in recorded.items() if v}
    if not recorded:
        return {}
    states = scheduler_states(list(recorded.values()))
    return {run_id: job for run_id, job in recorded.items() if states.get(job) in LIVE_STATES}
