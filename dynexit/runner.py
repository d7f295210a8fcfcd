"""Runs an experiment's grid on the devices there are, resumably, and keeps its CSV results current.

Each run has a folder ``<results_dir>/runs/<run_id>/``. A run holds an exclusive lock on its folder while
it executes (``fcntl.flock``, released by the OS even on SIGKILL), so "running" means "locked", and a
second runner never executes a run twice. Finished runs are skipped; interrupted ones resume from their
last checkpoint (the training loop restores everything); failed ones are marked with their error and
retried by the next invocation while the other runs go on. A finished run whose ``eval`` settings have
changed since it was evaluated ("stale") is evaluated again without training.

A run computes with the CPU threads of its configuration (``train.threads``), never a share of the
machine, so its numbers do not depend on how many workers run beside it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import multiprocessing as mp
import queue as queue_module
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dynexit.spec import Experiment, Run
from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
DONE, FAILED, RUNNING, INTERRUPTED, PENDING = "done", "failed", "running", "interrupted", "pending"
STALE = "stale"  # done, but evaluated with other eval settings than the run's configuration has now


def run_dir(experiment: Experiment, run: Run) -> Path:
    return experiment.results_dir / "runs" / run.run_id


# --------------------------------------------------------------------------- status

def read_status(folder: Path) -> dict:
    path = folder / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt status file {path}: {err}") from None


def write_status(folder: Path, state: str, **info) -> None:
    payload = {**read_status(folder), "state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    atomic_write_text(folder / STATUS_FILE, json.dumps(payload, indent=2, default=str))


def _locked(folder: Path) -> bool:
    lock = folder / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def run_state(folder: Path, eval_cfg=None) -> str:
    """done | failed | running | interrupted | pending; with ``eval_cfg`` (the run's EvalConfig), a done run
    whose outputs were computed with other eval settings is stale."""
    if not folder.is_dir():
        return PENDING
    if _locked(folder):
        return RUNNING
    state = read_status(folder).get("state")
    if state == DONE and eval_cfg is not None:
        from dynexit.pipeline import evaluation_changes

        return STALE if evaluation_changes(folder, eval_cfg) else DONE
    if state in (DONE, FAILED):
        return state
    return INTERRUPTED if state == RUNNING else PENDING


@contextmanager
def run_lock(folder: Path) -> Iterator[bool]:
    """Yields True while holding the run's lock, False if another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def experiment_status(experiment: Experiment) -> list[dict]:
    """One row per run: run id, variant, overrides, state, error (if failed, or if its re-evaluation
    failed), and for a stale run the eval settings that changed."""
    from dynexit.pipeline import evaluation_changes

    rows = []
    for run in experiment.runs:
        folder = run_dir(experiment, run)
        state = run_state(folder, run.config.eval)
        rows.append({"run_id": run.run_id, "variant": run.variant, "state": state,
                     "overrides": run.overrides,
                     "error": read_status(folder).get("error", "") if state in (FAILED, STALE) else "",
                     "eval_changes": evaluation_changes(folder, run.config.eval) if state == STALE else []})
    return rows


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
    """Environment of a worker process: its GPUs only (no GPU for a CPU worker). Its runs set their own
    thread counts (``train.threads``)."""
    if group[0] == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_VISIBLE_DEVICES": ",".join(d.split(":")[1] for d in group)}


# --------------------------------------------------------------------------- execution

@dataclass
class Outcome:
    run_id: str
    state: str
    error: str = ""


def execute(experiment: Experiment, run: Run, devices: list[str]) -> Outcome:
    """Executes one run in this process (skipping it if it is done or another process runs it); a done
    run whose eval settings changed is evaluated again, without training."""
    from dynexit.pipeline import run_pipeline

    folder = run_dir(experiment, run)
    with run_lock(folder) as acquired:
        if not acquired:
            return Outcome(run.run_id, RUNNING)
        if read_status(folder).get("state") == DONE:
            return _reevaluate(run, folder, devices[0])
        write_status(folder, RUNNING, pid=os.getpid(), devices=devices, threads=run.config.train.threads,
                     variant=run.variant, overrides=run.overrides, error="")
        log.info("run %s (%s %s) on %s", run.run_id, run.variant, run.overrides or "", ",".join(devices))
        try:
            run_pipeline(run.config, folder, devices)
        except Exception as err:  # noqa: BLE001 - a failed run is recorded; the others go on
            message = f"{type(err).__name__}: {err}"
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            write_status(folder, FAILED, error=message)
            log.error("run %s failed: %s", run.run_id, message)
            return Outcome(run.run_id, FAILED, message)
        write_status(folder, DONE)
    return Outcome(run.run_id, DONE)


def _reevaluate(run: Run, folder: Path, device: str) -> Outcome:
    """A done run, evaluated again if its eval settings changed (called holding the run's lock). It stays
    done whatever happens: a failed re-evaluation is recorded as its error and tried again next time,
    never turned into training from scratch."""
    from dynexit.pipeline import evaluate_run, evaluation_changes

    changes = evaluation_changes(folder, run.config.eval)
    if not changes:
        return Outcome(run.run_id, DONE)
    log.info("run %s (%s %s): evaluation settings changed (%s); evaluating it again without training",
             run.run_id, run.variant, run.overrides or "", "; ".join(changes))
    try:
        evaluate_run(run.config, folder, device)
    except Exception as err:  # noqa: BLE001 - recorded; the other runs go on
        message = f"re-evaluation failed: {type(err).__name__}: {err}"
        atomic_write_text(folder / "error.txt", traceback.format_exc())
        write_status(folder, DONE, error=message)
        log.error("run %s: %s", run.run_id, message)
        return Outcome(run.run_id, FAILED, message)
    write_status(folder, DONE, error="", reevaluated=changes)
    return Outcome(run.run_id, DONE)


def _worker(spec_path: str, overrides: list[str], results_dir: str, group: list[str], env: dict, queue,
            results, log_level: int = logging.INFO) -> None:
    os.environ.update(env)
    # A spawned process starts with logging unconfigured: show its progress as the parent would, tagged.
    logging.basicConfig(level=log_level, format=f"%(levelname)s [{','.join(group)} %(process)d] %(name)s: %(message)s")
    from dynexit.spec import load_spec

    experiment = load_spec(spec_path, overrides, results_dir)
    devices = group if group[0] == "cpu" else [f"cuda:{i}" for i in range(len(group))]
    while True:
        run_id = queue.get()
        if run_id is None:
            return
        outcome = execute(experiment, experiment.run(run_id), devices)
        results.put(outcome)
        from dynexit.results import aggregate

        aggregate(experiment)


def run_experiment(experiment: Experiment, devices: str = "auto", workers: int | None = None,
                   overrides: list[str] | None = None) -> list[Outcome]:
    """Runs every run of the experiment that is not done; returns the outcome of each run it tried."""
    import torch

    from dynexit.results import aggregate, write_experiment_files

    write_experiment_files(experiment)
    states = {r.run_id: run_state(run_dir(experiment, r), r.config.eval) for r in experiment.runs}
    todo = [r for r in experiment.runs if states[r.run_id] not in (DONE, RUNNING)]
    stale = sum(states[r.run_id] == STALE for r in todo)
    log.info("%s: %d runs, %d to do (%d to evaluate again without training)", experiment.name,
             len(experiment.runs), len(todo), stale)
    if not todo:
        aggregate(experiment)
        return []
    done_before = len(experiment.runs) - len(todo)
    kind = experiment.executor.kind
    if kind in ("slurm", "submitit_local"):
        from dynexit.slurm import submit

        parallel = experiment.executor.slurm_array_parallelism if kind == "slurm" else len(todo)
        outcomes = submit(experiment, todo, overrides, Progress(len(experiment.runs), done_before, len(todo), parallel))
    elif kind == "local":
        groups = plan_workers(devices, workers, torch.cuda.device_count(), experiment.executor.gpus_per_run)
        progress = Progress(len(experiment.runs), done_before, len(todo), len(groups))
        _warn_oversubscription(groups, todo)
        if len(groups) == 1 or len(todo) == 1:
            outcomes = []
            for run in todo:
                outcomes.append(progress.finished(execute(experiment, run, groups[0])))
                aggregate(experiment)
        else:
            outcomes = _run_pool(experiment, todo, groups, overrides, progress)
    else:
        raise ValueError(f"executor.kind must be local, slurm or submitit_local, not {kind!r}")
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
        eta = f", about {_clock(per_round * math.ceil(left / self.parallel))} left" if left else ""
        failed = f", {self.failed} failed" if self.failed else ""
        log.info("progress: %d/%d runs done%s, %s elapsed%s", self.done, self.total, failed, _clock(elapsed), eta)
        return outcome


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def _warn_oversubscription(groups: list[list[str]], todo: list[Run]) -> None:
    """CPU workers whose runs want more threads than the machine has slow each other down (the numbers
    stay the same: each run keeps its own thread count)."""
    cpu_workers = sum(g[0] == "cpu" for g in groups)
    cores = os.cpu_count() or 1
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
    procs = []
    for group in groups:
        queue.put(None)
        p = ctx.Process(target=_worker, args=(str(experiment.path), overrides or [], str(experiment.results_dir),
                                              group, worker_environment(group), queue, results,
                                              logging.getLogger().getEffectiveLevel()))
        p.start()
        procs.append(p)
    outcomes: list[Outcome] = []
    while len(outcomes) < len(todo):
        try:
            outcomes.append(progress.finished(results.get(timeout=1.0)))
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs):
                break  # every worker died (killed): what is left stays interrupted or pending
    for p in procs:
        p.join()
    for p in procs:
        if p.exitcode:
            log.error("a worker process ended with exit code %s", p.exitcode)
    return outcomes
