"""Run folders: where a run lives (``<results_dir>/runs/<run_id>/``), its state and its lock.

A run holds an exclusive lock on its folder while it executes (``fcntl.flock``, released by the OS even on
SIGKILL), so "running" means "locked". ``status.json`` records the rest: done, failed (with the error),
or running when the process died (interrupted). ``eval.json`` records the ``eval`` settings the run's
outputs were computed with (all but ``EXECUTION_SETTINGS``): a done run whose configuration now has other
ones is stale (evaluated again without training).
"""
from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynexit.config import EvalConfig, to_container
from dynexit.runs.spec import Experiment, Run
from dynexit.utils import atomic_write_text

STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"  # the run's row of runs.csv, written last by the pipeline
EVAL_FILE = "eval.json"  # the eval settings the run's outputs were computed with
# The eval settings the saved logits depend on (which weights, and the batches they ran in); the others
# (grid, criterion, budgets) only change what is computed from the logits.
LOGIT_SETTINGS = ("use_ema", "batch_size")
# Eval settings that change how the logits are computed, not what they are (beyond float rounding): left
# out of eval.json and of the comparison, so switching them never makes a finished run stale.
EXECUTION_SETTINGS = ("compile",)
DONE, FAILED, RUNNING, INTERRUPTED, PENDING = "done", "failed", "running", "interrupted", "pending"
QUEUED = "queued"  # submitted to a scheduler (status.json keeps the job id), not started yet
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


def run_state(folder: Path, eval_cfg: EvalConfig | None = None) -> str:
    """done | failed | running | interrupted | queued | pending; with ``eval_cfg`` (the run's EvalConfig), a done run
    whose outputs were computed with other eval settings is stale."""
    if not folder.is_dir():
        return PENDING
    if _locked(folder):
        return RUNNING
    state = read_status(folder).get("state")
    if state == DONE and eval_cfg is not None:
        return STALE if evaluation_changes(folder, eval_cfg) else DONE
    if state in (DONE, FAILED):
        return state
    if state == QUEUED:
        return QUEUED
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
    """One row per run: run id, variant, overrides, state, scheduler job id (if submitted), error (if
    failed, or if its re-evaluation failed), and for a stale run the eval settings that changed."""
    rows = []
    for run in experiment.runs:
        folder = run_dir(experiment, run)
        state = run_state(folder, run.config.eval)
        rows.append({"run_id": run.run_id, "variant": run.variant, "state": state,
                     "overrides": run.overrides, "job_id": read_status(folder).get("job_id", ""),
                     "error": read_status(folder).get("error", "") if state in (FAILED, STALE) else "",
                     "eval_changes": evaluation_changes(folder, run.config.eval) if state == STALE else []})
    return rows


# --------------------------------------------------------------------------- the evaluation record

def evaluation_record(eval_cfg: EvalConfig) -> dict:
    """What ``eval.json`` holds: the settings of the saved logits, and those of the outputs computed from them."""
    settings = to_container(eval_cfg)
    for key in EXECUTION_SETTINGS:
        settings.pop(key)
    logits = {key: settings.pop(key) for key in LOGIT_SETTINGS}
    return {"logits": logits, "outputs": settings}


def read_evaluation_record(folder: Path) -> dict:
    """The run folder's ``eval.json`` ({} when there is none)."""
    path = Path(folder) / EVAL_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt evaluation record {path}: {err}; delete it and run again to re-evaluate "
                         f"the run") from None
    if not isinstance(record, dict):
        raise ValueError(f"corrupt evaluation record {path}: expected a JSON object")
    return record


def evaluation_changes(folder: Path, eval_cfg: EvalConfig) -> list[str]:
    """``"eval.key: old -> new"`` for every eval setting that differs from those the run folder's outputs
    were computed with ([] when they are up to date; one entry when the folder has no record)."""
    record = read_evaluation_record(folder)
    if not record:
        return [f"no {EVAL_FILE}"]
    want = evaluation_record(eval_cfg)
    changes = []
    for part in ("logits", "outputs"):
        old, new = record.get(part, {}), want[part]
        for key in sorted(set(old) | set(new)):
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                changes.append(f"eval.{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return changes

