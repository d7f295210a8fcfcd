"""Runs an experiment's runs as SLURM jobs through submitit (``executor.kind: slurm``), or as local
processes through submitit's local executor (``submitit_local``, for testing the same path)."""
from __future__ import annotations

import logging

from dynexit.runs.aggregate import aggregate
from dynexit.runs.execute import execute
from dynexit.runs.spec import Experiment, Run, load_spec

log = logging.getLogger(__name__)


def _job(spec_path: str, overrides: list[str], results_dir: str, run_id: str):
    """What one job runs: the run (with its own thread count, ``train.threads``), then the experiment's
    aggregate files."""
    import torch

    experiment = load_spec(spec_path, overrides, results_dir)
    n = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(min(n, experiment.executor.gpus_per_run))] if n else ["cpu"]
    outcome = execute(experiment, experiment.run(run_id), devices)
    aggregate(experiment)
    return outcome


def submit(experiment: Experiment, runs: list[Run], overrides: list[str] | None, progress=None):
    """Submits one job per run and waits for them; ``progress`` (a ``dynexit.runs.runner.Progress``) hears of
    each outcome as its job is collected."""
    import submitit

    if experiment.path is None:
        raise ValueError("SLURM runs need the experiment to come from a spec file")
    ex = experiment.executor
    cluster = "local" if ex.kind == "submitit_local" else "slurm"
    executor = submitit.AutoExecutor(folder=experiment.results_dir / "submitit" / "%j", cluster=cluster)
    params = {"timeout_min": ex.timeout_min, "gpus_per_node": ex.gpus_per_run if cluster == "slurm" else 0,
              "cpus_per_task": ex.cpus_per_task}
    if cluster == "slurm":
        params.update(mem_gb=ex.mem_gb, slurm_array_parallelism=ex.slurm_array_parallelism)
        if ex.slurm_partition:
            params["slurm_partition"] = ex.slurm_partition
        if ex.slurm_account:
            params["slurm_account"] = ex.slurm_account
    executor.update_parameters(**params)
    jobs = [executor.submit(_job, str(experiment.path), overrides or [], str(experiment.results_dir), run.run_id)
            for run in runs]
    log.info("submitted %d jobs (%s): %s", len(jobs), cluster, ", ".join(str(j.job_id) for j in jobs[:8]))
    outcomes = []
    for job in jobs:
        outcome = job.result()
        outcomes.append(progress.finished(outcome) if progress is not None else outcome)
    return outcomes
