"""Run folders: where a run lives (``<results_dir>/runs/<run_id>/``), its state and its lock, and the mark
that says which experiment a results folder belongs to.

A run holds an exclusive lock on its folder while it executes (``fcntl.flock``, released by the OS even on
SIGKILL), so "running" means "locked". Readers (status, reports, a worker's scan) only probe it with a
shared lock, and a runner waits a moment for such a probe to end: reading never makes a runner skip a run.
``status.json`` records the rest: done, failed (with the error), or running when the process died
(interrupted). ``eval.json`` records the ``eval`` settings the run's outputs were computed with (all but
``EXECUTION_SETTINGS``): a done run whose configuration now has other ones is stale (evaluated again
without training).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynexit.config import EvalConfig, to_container
from dynexit.runs.spec import Experiment, Run
from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- the results folder's mark

MARK_FILE = ".dynexit.json"  # {"experiment": name}: dynexit made this results folder, for this experiment


def read_mark(folder: Path) -> str | None:
    """The experiment a results folder is marked for (None: no mark); a damaged mark names its path."""
    path = Path(folder) / MARK_FILE
    if not path.is_file():
        return None
    try:
        mark = json.loads(path.read_text())
        return str(mark["experiment"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"damaged results-folder mark {path} ({err}); it should hold "
                         f'{{"experiment": "<name>"}}: restore it, or delete the folder') from None


def check_results_folder(experiment: Experiment) -> None:
    """ValueError, before anything is written, unless the results folder is new, empty, or this experiment's:
    marked for it, or (made before marks) holding its ``experiment.yaml`` of the same name."""
    folder = experiment.results_dir
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"results folder {folder} is a file; give the experiment another results_dir")
    marked = read_mark(folder)
    where = "--out or the spec's results_dir"
    if marked is not None:
        if marked != experiment.name:
            raise ValueError(f"results folder {folder} holds the results of experiment {marked!r}, not "
                             f"{experiment.name!r}; give this experiment its own folder ({where}), or name it "
                             f"{marked!r} to add its runs to that experiment")
        return
    if not any(folder.iterdir()):
        return
    spec = folder / "experiment.yaml"
    if spec.is_file():
        import yaml

        try:
            earlier = (yaml.safe_load(spec.read_text()) or {}).get("name")
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
            earlier = None
        if earlier == experiment.name:
            return  # written by a dynexit that did not mark its folders yet: marked when written next
    raise ValueError(f"results folder {folder} exists and holds files that dynexit did not write for experiment "
                     f"{experiment.name!r} (it has no {MARK_FILE}); choose another folder ({where}) or move its "
                     f"files away: nothing was written")


def mark_results_folder(experiment: Experiment) -> None:
    """Marks the results folder as this experiment's (after ``check_results_folder``)."""
    folder = experiment.results_dir
    folder.mkdir(parents=True, exist_ok=True)
    if read_mark(folder) != experiment.name:
        atomic_write_text(folder / MARK_FILE, json.dumps({"experiment": experiment.name}) + "\n")


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
    """Whether a runner holds the run's lock: probed with a shared lock, which runners wait out."""
    lock = folder / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
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


# How long a runner waits for a lock held by someone else before it takes the run as running elsewhere:
# readers hold their shared probe for microseconds, runners hold the lock for the whole run.
LOCK_WAIT_SECONDS = 2.0
# Set by a process that holds a run folder's lock for the children it starts on that folder (torchrun's
# ranks of a multi-GPU run): they work under the parent's lock instead of waiting for it.
LOCK_HELD_ENV = "DYNEXIT_RUN_LOCK_HELD"


@contextmanager
def run_lock(folder: Path, wait: float = LOCK_WAIT_SECONDS) -> Iterator[bool]:
    """Yields True while holding the run's exclusive lock, False if another process holds it for longer
    than ``wait`` seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_held_by_parent(folder: Path) -> bool:
    """Whether this process works under a run lock its parent holds on ``folder`` (``LOCK_HELD_ENV``)."""
    return os.environ.get(LOCK_HELD_ENV) == str(Path(folder).resolve())


def folder_runs(experiment: Experiment) -> list[Run]:
    """The experiment's runs, then every other run folder of its results folder (by id), each as the Run its
    folder records (configuration from its ``config.yaml``, read as data; variant and overrides from its
    status). A folder whose configuration cannot be read is left out, naming it."""
    from dynexit.config import load_run_config

    runs = list(experiment.runs)
    own = {run.run_id for run in runs}
    root = experiment.results_dir / "runs"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name in own or not folder.is_dir() or not (folder / "config.yaml").is_file():
            continue
        try:
            cfg = load_run_config(folder / "config.yaml", import_factories=False)
            status = read_status(folder)
        except (ValueError, TypeError, OSError) as err:
            log.error("run folder %s left out of the experiment's tables: %s", folder, err)
            continue
        runs.append(Run(folder.name, str(status.get("variant", "?")), dict(status.get("overrides") or {}), cfg))
    return runs


def experiment_status(experiment: Experiment) -> list[dict]:
    """One row per run of the experiment, then per other run folder in its results folder (``in_spec``
    False: made by another spec of the experiment, a variant since removed, or ``--set``): run id, variant,
    overrides, state, scheduler job id (if submitted), error (if failed, or if its re-evaluation failed), and
    for a stale run the eval settings that changed."""
    rows = []
    own = {run.run_id for run in experiment.runs}
    for run in folder_runs(experiment):
        folder = run_dir(experiment, run)
        state = run_state(folder, run.config.eval if run.run_id in own else None)
        status = read_status(folder)
        rows.append({"run_id": run.run_id, "variant": run.variant, "state": state, "in_spec": run.run_id in own,
                     "overrides": run.overrides, "job_id": status.get("job_id", ""),
                     "error": status.get("error", "") if state in (FAILED, STALE) else "",
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


def evaluation_complete(folder: Path) -> bool:
    """Whether the run folder's outputs all come from one finished evaluation: its record has both parts
    (an evaluation marks its record incomplete before it touches any output, and completes it last)."""
    record = read_evaluation_record(folder)
    return isinstance(record.get("logits"), dict) and isinstance(record.get("outputs"), dict)


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

