"""Runs an experiment's grid on the devices there are, resumably, and keeps its CSV results current.

Each run has a folder ``<results_dir>/runs/<run_id>/`` (:mod:`dynexit.runs.folders`); a run locks it while
it executes, so a second runner never executes a run twice. Finished runs are skipped; interrupted ones
resume from their last checkpoint (the training loop restores everything); failed ones are marked with
their error and retried by the next invocation while the other runs go on. A finished run whose ``eval``
settings have changed since it was evaluated ("stale") is evaluated again without training.

A run computes with the CPU threads of its configuration (``train.threads``), never a share of the
machine, so its numbers do not depend on how many workers run beside it.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time

from dynexit.runs.aggregate import aggregate, write_experiment_files
from dynexit.runs.devices import available_cores, device_environment, device_locks, is_cuda_error, lock_names
from dynexit.runs.execute import Outcome, execute
from dynexit.runs.folders import DONE, FAILED, RUNNING, STALE, check_results_folder, run_dir, run_state
from dynexit.runs.slurm import job_layout, job_resources, live_job_ids, submit
from dynexit.runs.spec import Experiment, Run, reload_spec
from dynexit.training.progress_bar import NO_BAR_ENV

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


def worker_environment(group: list[str]) -> dict[str, str]:
    """Environment of a worker process: its GPUs only, as this process's ``CUDA_VISIBLE_DEVICES`` names them
    (no GPU for a CPU worker). Its runs set their own thread counts (``train.threads``)."""
    return device_environment(group)


RETIRED = 75  # exit code of a worker that stopped after a CUDA error (its process is replaced)


def _worker(raw: dict, spec_path: str, overrides: list[str], results_dir: str, group: list[str], env: dict,
            locks: list[str], queue, results, log_level: int = logging.INFO) -> None:
    """Runs the queue's runs on ``group`` (shown to it by ``env``), holding the GPU locks ``locks`` (the UUIDs
    the parent read: reading them here would initialise CUDA before ``env`` narrows the devices)."""
    os.environ.update(env)
    os.environ[NO_BAR_ENV] = "1"  # bars of several workers would interleave: the parent's progress log shows
    # A spawned process starts with logging unconfigured: show its progress as the parent would, tagged.
    logging.basicConfig(level=log_level, format=f"%(levelname)s [{','.join(group)} %(process)d] %(name)s: %(message)s")
    experiment = reload_spec(raw, spec_path, overrides, results_dir)  # as the runner read it, not the file now
    devices = group if group[0] == "cpu" else [f"cuda:{i}" for i in range(len(group))]
    while True:
        run_id = queue.get()
        if run_id is None:
            return
        with device_locks(locks):
            outcome = execute(experiment, experiment.run(run_id), devices)
        results.put(outcome)
        aggregate(experiment)
        if outcome.state == FAILED and is_cuda_error(outcome.error):
            logging.getLogger(__name__).error("CUDA error on %s: this worker stops and is replaced by a new "
                                              "process", ",".join(group))
            sys.exit(RETIRED)


def check_experiment(experiment: Experiment) -> None:
    """What can be wrong with an experiment before it runs, checked before anything is written: every run's
    configuration (an error names the run, its variant and the key), the executor and the results folder
    (new, or this experiment's)."""
    from dynexit.config import validate_run_config

    where = str(experiment.path) if experiment.path else f"experiment {experiment.name!r}"
    for run in experiment.runs:
        try:
            validate_run_config(run.config)
        except (ValueError, TypeError) as err:
            overrides = f" with {run.overrides}" if run.overrides else ""
            raise type(err)(f"{where}: run {run.run_id} (variant {run.variant!r}{overrides}): {err}") from None
    kind = experiment.executor.kind
    if kind != "local" and experiment.path is None:
        raise ValueError(f"{where}: {kind} runs need the experiment to come from a spec file")
    try:
        job_layout(experiment.executor)  # executor.nodes against the kind and the GPUs
        if kind != "local":
            job_resources(experiment, experiment.runs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    check_results_folder(experiment)


def run_experiment(experiment: Experiment, devices: str = "auto", workers: int | None = None,
                   overrides: list[str] | None = None, wait: bool | None = None) -> list[Outcome]:
    """Runs every run of the experiment that is not done; returns the outcome of each run it tried.
    Every configuration and the devices are checked first: a bad value writes nothing.

    SLURM runs are submitted as one job array; the call returns once they are submitted (``[]``) unless
    ``wait`` (default: wait for ``submitit_local`` jobs, not for ``slurm`` ones). A run whose SLURM job is
    still queued or running is not submitted again."""
    import torch

    check_experiment(experiment)
    kind = experiment.executor.kind
    groups = (plan_workers(devices, workers, torch.cuda.device_count(), experiment.executor.gpus_per_run)
              if kind == "local" else [])
    write_experiment_files(experiment)
    states = {r.run_id: run_state(run_dir(experiment, r), r.config.eval) for r in experiment.runs}
    todo = [r for r in experiment.runs if states[r.run_id] not in (DONE, RUNNING)]
    live = live_job_ids(experiment, todo)
    if live:
        log.info("%d runs have SLURM jobs queued or running; not submitted again: %s", len(live),
                 ", ".join(f"{k}={v}" for k, v in list(live.items())[:8]))
        todo = [r for r in todo if r.run_id not in live]
    stale = sum(states[r.run_id] == STALE for r in todo)
    log.info("%s: %d runs, %d to do (%d to evaluate again without training)", experiment.name,
             len(experiment.runs), len(todo), stale)
    if not todo:
        aggregate(experiment)
        return []
    done_before = len(experiment.runs) - len(todo)
    if kind in ("slurm", "submitit_local"):
        parallel = experiment.executor.slurm_array_parallelism if kind == "slurm" else len(todo)
        wait = (kind == "submitit_local") if wait is None else wait
        outcomes = submit(experiment, todo, overrides, Progress(len(experiment.runs), done_before, len(todo), parallel),
                          wait=wait)
    else:
        progress = Progress(len(experiment.runs), done_before, len(todo), len(groups))
        _warn_oversubscription(groups, todo)
        if len(groups) == 1 or len(todo) == 1:
            outcomes = []
            for run in todo:
                with device_locks(lock_names(groups[0])):
                    outcomes.append(progress.finished(execute(experiment, run, groups[0])))
                aggregate(experiment)
        else:
            outcomes = _run_pool(experiment, todo, groups, overrides, progress)
    aggregate(experiment)
    return outcomes


class Progress:
    """Logs, as runs finish, how many of the experiment's runs are done, the time spent and the time left.

    The time left assumes ``parallel`` runs at a time: the runs still to do, in rounds of ``parallel``, at
    the time a round has taken so far (the first of two workers to finish does not mean one run per that
    time)."""

    def __init__(self, total: int, done_before: int, todo: int, parallel: int = 1):
        self.total, self.done, self.todo, self.finished_now = total, done_before, todo, 0
        self.parallel = max(1, min(parallel, todo))
        self.failed = 0
        self.start = time.monotonic()

    def finished(self, outcome: Outcome) -> Outcome:
        self.finished_now += 1
        if outcome.state == DONE:
            self.done += 1
        elif outcome.state == FAILED:
            self.failed += 1
        elapsed = time.monotonic() - self.start
        left = self.todo - self.finished_now
        per_round = elapsed / math.ceil(self.finished_now / self.parallel)
        eta = f", about {clock(per_round * math.ceil(left / self.parallel))} left" if left else ""
        failed = f", {self.failed} failed" if self.failed else ""
        log.info("progress: %d/%d runs done%s, %s elapsed%s", self.done, self.total, failed, clock(elapsed), eta)
        return outcome


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def _warn_oversubscription(groups: list[list[str]], todo: list[Run]) -> None:
    """CPU workers whose runs want more threads than the machine has slow each other down (the numbers
    stay the same: each run keeps its own thread count)."""
    cpu_workers = sum(g[0] == "cpu" for g in groups)
    cores = available_cores()
    wanted = min(cpu_workers, len(todo)) * max(r.config.train.threads for r in todo)
    if cpu_workers and wanted > cores:
        log.warning("%d CPU workers x up to %d threads per run (train.threads) = %d threads on %d cores: the "
                    "runs will be slower than they could be (their numbers stay the same)", min(cpu_workers, len(todo)),
                    max(r.config.train.threads for r in todo), wanted, cores)


def _run_pool(experiment: Experiment, todo: list[Run], groups: list[list[str]],
              overrides: list[str] | None, progress: Progress) -> list[Outcome]:
    if experiment.path is None:
        raise ValueError("parallel workers need the experiment to come from a spec file")
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    for run in todo:
        queue.put(run.run_id)
    def start(group: list[str]):
        p = ctx.Process(target=_worker, args=(experiment.raw, str(experiment.path), overrides or [],
                                              str(experiment.results_dir),
                                              group, worker_environment(group), locks[tuple(group)], queue,
                                              results,
                                              logging.getLogger().getEffectiveLevel()))
        p.start()
        return p

    locks = {tuple(group): lock_names(group) for group in groups}  # GPU UUIDs, read here before any worker starts
    procs = []
    for group in groups:
        queue.put(None)
        procs.append((group, start(group)))
    outcomes: list[Outcome] = []
    ended = []
    while len(outcomes) < len(todo):
        try:
            outcomes.append(progress.finished(results.get(timeout=1.0)))
        except queue_module.Empty:
            pass
        for i, (group, p) in enumerate(procs):
            if not p.is_alive() and p.exitcode == RETIRED and len(outcomes) < len(todo):
                log.warning("worker on %s stopped after a CUDA error; starting a new process for it", ",".join(group))
                ended.append(p)
                procs[i] = (group, start(group))
        if not any(p.is_alive() for _, p in procs) and results.empty():
            break  # every worker died (killed): what is left stays interrupted or pending
    for p in ended + [p for _, p in procs]:
        p.join()
        if p.exitcode and p.exitcode != RETIRED:
            log.error("a worker process ended with exit code %s", p.exitcode)
    return outcomes
