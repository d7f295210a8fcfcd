"""Runs an experiment's grid on the devices there are, resumably, and keeps its CSV results current.

Each run has a folder ``<results_dir>/runs/<run_id>/`` (:mod:`dynexit.runs.folders`); a run locks it while
it executes, so a second runner never executes a run twice. Finished runs are skipped; interrupted ones
resume from their last checkpoint (the training loop restores everything); failed ones are marked with
their error and retried by the next invocation while the other runs go on.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_module

from dynexit.runs.aggregate import aggregate, write_experiment_files
from dynexit.runs.execute import Outcome, execute
from dynexit.runs.folders import DONE, RUNNING, run_dir, run_state
from dynexit.runs.slurm import submit
from dynexit.runs.spec import Experiment, Run, load_spec

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- devices

def plan_workers(devices: str, workers: int | None, cuda_count: int, gpus_per_run: int = 1) -> list[list[str]]:
    """The devices of each worker: ``[["cpu"], ["cpu"]]`` for two CPU workers, ``[["cuda:0"], ["cuda:1"]]``
    for one worker per GPU, ``[["cuda:0", "cuda:1"]]`` for one worker training through torchrun on two.

    ``devices`` is "auto" (every GPU, else the CPU), "cpu", or a list such as "cuda:0,cuda:1".
    """
    if devices == "auto":
        devices = ",".join(f"cuda:{i}" for i in range(cuda_count)) if cuda_count else "cpu"
    if devices == "cpu":
        n = workers or 1
        if n < 1:
            raise ValueError(f"--workers must be at least 1, got {n}")
        return [["cpu"] for _ in range(n)]
    names = [d.strip() for d in devices.split(",") if d.strip()]
    for name in names:
        if not name.startswith("cuda:") or not name[5:].isdigit():
            raise ValueError(f"--devices: {name!r} is not 'cpu', 'auto' or 'cuda:N'")
        if int(name[5:]) >= cuda_count:
            raise ValueError(f"--devices: {name} does not exist ({cuda_count} CUDA device(s) visible)")
    if len(set(names)) != len(names):
        raise ValueError(f"--devices lists a device twice: {devices}")
    if len(names) % gpus_per_run:
        raise ValueError(f"{len(names)} GPUs cannot be split into groups of gpus_per_run={gpus_per_run}")
    groups = [names[i:i + gpus_per_run] for i in range(0, len(names), gpus_per_run)]
    return groups[: workers] if workers else groups


def worker_environment(group: list[str], cpu_workers: int) -> dict[str, str]:
    """Environment of a worker process: its GPUs only, or its share of the CPU threads."""
    if group[0] == "cpu":
        threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
        return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
    return {"CUDA_VISIBLE_DEVICES": ",".join(d.split(":")[1] for d in group)}


def _worker(spec_path: str, overrides: list[str], group: list[str], env: dict, queue, results,
            log_level: int = logging.INFO) -> None:
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # torch was imported (unpickling this function) before the variable was set
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # A spawned process starts with logging unconfigured: show its progress as the parent would, tagged.
    logging.basicConfig(level=log_level, format=f"%(levelname)s [{','.join(group)} %(process)d] %(name)s: %(message)s")
    experiment = load_spec(spec_path, overrides)
    devices = group if group[0] == "cpu" else [f"cuda:{i}" for i in range(len(group))]
    while True:
        run_id = queue.get()
        if run_id is None:
            return
        outcome = execute(experiment, experiment.run(run_id), devices)
        results.put(outcome)
        aggregate(experiment)


EXECUTORS = ("local", "slurm", "submitit_local")


def check_experiment(experiment: Experiment) -> None:
    """What can be wrong with an experiment before it runs, checked before anything is written: every run's
    configuration (an error names the run, its variant and the key) and the executor."""
    from dynexit.config import validate_run_config

    where = str(experiment.path) if experiment.path else f"experiment {experiment.name!r}"
    for run in experiment.runs:
        try:
            validate_run_config(run.config)
        except (ValueError, TypeError) as err:
            overrides = f" with {run.overrides}" if run.overrides else ""
            raise type(err)(f"{where}: run {run.run_id} (variant {run.variant!r}{overrides}): {err}") from None
    kind = experiment.executor.kind
    if kind not in EXECUTORS:
        raise ValueError(f"{where}: executor.kind must be {', '.join(EXECUTORS)}, not {kind!r}")
    if kind != "local" and experiment.path is None:
        raise ValueError(f"{where}: {kind} runs need the experiment to come from a spec file")


def run_experiment(experiment: Experiment, devices: str = "auto", workers: int | None = None,
                   overrides: list[str] | None = None) -> list[Outcome]:
    """Runs every run of the experiment that is not done; returns the outcome of each run it tried.
    Every configuration and the devices are checked first: a bad value writes nothing."""
    import torch

    check_experiment(experiment)
    kind = experiment.executor.kind
    groups = (plan_workers(devices, workers, torch.cuda.device_count(), experiment.executor.gpus_per_run)
              if kind == "local" else [])
    write_experiment_files(experiment)
    todo = [r for r in experiment.runs if run_state(run_dir(experiment, r)) not in (DONE, RUNNING)]
    log.info("%s: %d runs, %d to do", experiment.name, len(experiment.runs), len(todo))
    if not todo:
        aggregate(experiment)
        return []
    if kind in ("slurm", "submitit_local"):
        outcomes = submit(experiment, todo, overrides)
    elif len(groups) == 1 or len(todo) == 1:
        outcomes = []
        for run in todo:
            outcomes.append(execute(experiment, run, groups[0]))
            aggregate(experiment)
    else:
        outcomes = _run_pool(experiment, todo, groups, overrides)
    aggregate(experiment)
    return outcomes


def _run_pool(experiment: Experiment, todo: list[Run], groups: list[list[str]],
              overrides: list[str] | None) -> list[Outcome]:
    if experiment.path is None:
        raise ValueError("parallel workers need the experiment to come from a spec file")
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    for run in todo:
        queue.put(run.run_id)
    cpu_workers = sum(g[0] == "cpu" for g in groups)
    procs = []
    for group in groups:
        queue.put(None)
        p = ctx.Process(target=_worker, args=(str(experiment.path), overrides or [], group,
                                              worker_environment(group, cpu_workers), queue, results,
                                              logging.getLogger().getEffectiveLevel()))
        p.start()
        procs.append(p)
    outcomes: list[Outcome] = []
    while len(outcomes) < len(todo):
        try:
            outcomes.append(results.get(timeout=1.0))
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs):
                break  # every worker died (killed): what is left stays interrupted or pending
    for p in procs:
        p.join()
    for p in procs:
        if p.exitcode:
            log.error("a worker process ended with exit code %s", p.exitcode)
    return outcomes
