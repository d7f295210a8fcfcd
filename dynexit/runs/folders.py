"""Run folders: where a run lives (``<results_dir>/runs/<run_id>/``), its state and its lock.

A run holds an exclusive lock on its folder while it executes (``fcntl.flock``, released by the OS even on
SIGKILL), so "running" means "locked". ``status.json`` records the rest: done, failed (with the error),
or running when the process died (interrupted).
"""
from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynexit.runs.spec import Experiment, Run
from dynexit.utils import atomic_write_text

STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"  # the run's row of runs.csv, written last by the pipeline
DONE, FAILED, RUNNING, INTERRUPTED, PENDING = "done", "failed", "running", "interrupted", "pending"


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


def run_state(folder: Path) -> str:
    """done | failed | running | interrupted | pending."""
    if not folder.is_dir():
        return PENDING
    if _locked(folder):
        return RUNNING
    state = read_status(folder).get("state")
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
    """One row per run: run id, variant, overrides, state, error (if failed)."""
    rows = []
    for run in experiment.runs:
        folder = run_dir(experiment, run)
        state = run_state(folder)
        rows.append({"run_id": run.run_id, "variant": run.variant, "state": state,
                     "overrides": run.overrides,
                     "error": read_status(folder).get("error", "") if state == FAILED else ""})
    return rows
