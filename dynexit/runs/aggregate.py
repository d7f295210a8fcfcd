"""An experiment's aggregate files, rebuilt from its run folders: ``runs.csv`` (one row per finished run)
and ``curves.csv`` (one row per run and operating point), and the run index ``index.csv``.

They list every finished run in the results folder, whichever spec, variant or ``--set`` made it: the
experiment's own runs in the spec's order, then the others by id. Rebuilding from the folders, under a
lock, keeps exactly one row per run however many workers finish at once; files are replaced atomically.
A run whose files cannot be read, or whose evaluation is incomplete (a re-evaluation failed or was
interrupted), is left out by name in the log, never silently."""
from __future__ import annotations

import fcntl
import json
import logging
from pathlib import Path

import pandas as pd
import yaml

from dynexit.runs.folders import (
    DONE,
    SUMMARY_FILE,
    evaluation_complete,
    folder_runs,
    mark_results_folder,
    read_evaluation_record,
    read_status,
    run_dir,
)
from dynexit.runs.spec import Experiment, Run
from dynexit.utils import atomic_write, atomic_write_text, flatten_dict, read_csv_file, read_json_file

log = logging.getLogger(__name__)

# The eval settings that say how a run's curve was computed, as columns of runs.csv and curves.csv.
EVAL_COLUMNS = ("eval.criterion", "eval.grid", "eval.use_ema", "eval.batch_size")


def run_columns(experiment: Experiment, run: Run) -> dict:
    """Identifying columns of a run: id, variant, model and data names, and every key the grid varies."""
    from dynexit.config import to_container

    flat = flatten_dict(to_container(run.config))
    model = flat.get("model.factory") or flat["model.name"]  # a factory's model is named by its factory
    columns = {"run_id": run.run_id, "variant": run.variant, "model.name": model,
               "data.name": flat["data.name"], "seed": flat["seed"]}
    for key in experiment.grid_keys:
        columns[key] = flat.get(key, run.overrides.get(key))
    return columns


def evaluation_columns(folder: Path) -> dict:
    """How the run's outputs were computed (``EVAL_COLUMNS``), from its evaluation record."""
    record = read_evaluation_record(folder)
    settings = {**record.get("logits", {}), **record.get("outputs", {})}
    return {column: settings.get(column.split(".", 1)[1]) for column in EVAL_COLUMNS}


def aggregate(experiment: Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Writes runs.csv and curves.csv for every finished run in the results folder (see the module
    docstring): the same finished runs give the same bytes, whatever order they finished in."""
    out = experiment.results_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".aggregate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows, curves = [], []
        for run in folder_runs(experiment):
            folder = run_dir(experiment, run)
            try:
                if read_status(folder).get("state") != DONE:  # a lock alone (a check, a re-evaluation) changes nothing
                    continue
                if not evaluation_complete(folder):
                    log.warning("run %s left out of runs.csv: its evaluation is incomplete (%s); the next "
                                "'dynexit run' evaluates it again", run.run_id,
                                read_status(folder).get("error") or "interrupted")
                    continue
                summary = read_json_file(folder / SUMMARY_FILE, "run summary")
                curve = read_csv_file(folder / "curve.csv", "run curve")
                check_curve(curve, folder / "curve.csv")
            except (ValueError, OSError) as err:
                log.error("run %s left out of runs.csv: %s", run.run_id, err)
                continue
            ids = run_columns(experiment, run)
            evaluation = {k: v for k, v in evaluation_columns(folder).items() if k not in ids}  # last columns
            rows.append({**ids, **summary, **evaluation})
            if "point" not in curve.columns:  # a static run's single point
                curve.insert(0, "point", range(len(curve)))
            for i, (key, value) in enumerate(ids.items()):
                curve.insert(i, key, value)
            for key, value in evaluation.items():
                curve[key] = value
            curves.append(curve)
        runs = pd.DataFrame(rows)
        curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
        atomic_write(out / "runs.csv", lambda tmp: runs.to_csv(tmp, index=False))
        atomic_write(out / "curves.csv", lambda tmp: curves_df.to_csv(tmp, index=False))
    return runs, curves_df


CURVE_COLUMNS = ("test_accuracy", "test_expected_cost")


def check_curve(curve: pd.DataFrame, path: Path) -> None:
    """ValueError naming ``path`` when a run's curve lacks its columns or has blank cells (a damaged file)."""
    missing = [c for c in CURVE_COLUMNS if c not in curve.columns]
    if missing or curve.empty or curve[list(CURVE_COLUMNS)].isna().any().any():
        raise ValueError(f"damaged run curve {path}: "
                         + (f"no column {', '.join(missing)}" if missing else "empty or blank cells")
                         + "; delete it and run the experiment again to re-evaluate the run")


def write_experiment_files(experiment: Experiment) -> None:
    """The results folder's mark, the spec as run (``experiment.yaml``) and the run index (``index.csv``: id,
    variant, overrides of the experiment's runs and of every other run folder in it)."""
    out = experiment.results_dir
    mark_results_folder(experiment)
    atomic_write_text(out / "experiment.yaml", yaml.safe_dump(experiment.raw, sort_keys=False))
    index = pd.DataFrame([{"run_id": r.run_id, "variant": r.variant, "overrides": json.dumps(r.overrides)}
                          for r in folder_runs(experiment)])
    atomic_write(out / "index.csv", lambda tmp: index.to_csv(tmp, index=False))
