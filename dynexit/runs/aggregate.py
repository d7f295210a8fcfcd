"""An experiment's aggregate files, rebuilt from its run folders: ``runs.csv`` (one row per run) and
``curves.csv`` (one row per run and operating point). Rebuilding from the folders, under a lock, keeps
exactly one row per run however many workers finish at once; files are replaced atomically."""
from __future__ import annotations

import fcntl
import json

import pandas as pd
import yaml

from dynexit.runs.folders import DONE, SUMMARY_FILE, run_dir, run_state
from dynexit.runs.spec import Experiment
from dynexit.utils import atomic_write, atomic_write_text, flatten_dict


def run_columns(experiment: Experiment, run) -> dict:
    """Identifying columns of a run: id, variant, model and data names, and every key the grid varies."""
    from dynexit.config import to_container

    flat = flatten_dict(to_container(run.config))
    model = flat.get("model.factory") or flat["model.name"]  # a factory's model is named by its factory
    columns = {"run_id": run.run_id, "variant": run.variant, "model.name": model,
               "data.name": flat["data.name"], "seed": flat["seed"]}
    for key in experiment.grid_keys:
        columns[key] = flat.get(key, run.overrides.get(key))
    return columns


def aggregate(experiment: Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Writes runs.csv and curves.csv for the finished runs of ``experiment``, in the spec's order of runs
    (not the order in which they finished): the same finished runs give the same bytes."""
    out = experiment.results_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".aggregate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows, curves = [], []
        for run in experiment.runs:
            folder = run_dir(experiment, run)
            if run_state(folder) != DONE or not (folder / SUMMARY_FILE).is_file():
                continue
            ids = run_columns(experiment, run)
            summary = json.loads((folder / SUMMARY_FILE).read_text())
            rows.append({**ids, **summary})
            curve = pd.read_csv(folder / "curve.csv")
            if "point" not in curve.columns:  # a static run's single point
                curve.insert(0, "point", range(len(curve)))
            for i, (key, value) in enumerate(ids.items()):
                curve.insert(i, key, value)
            curves.append(curve)
        runs = pd.DataFrame(rows)
        curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
        atomic_write(out / "runs.csv", lambda tmp: runs.to_csv(tmp, index=False))
        atomic_write(out / "curves.csv", lambda tmp: curves_df.to_csv(tmp, index=False))
    return runs, curves_df


def write_experiment_files(experiment: Experiment) -> None:
    """The spec as run (``experiment.yaml``) and the run index (``index.csv``: id, variant, overrides)."""
    out = experiment.results_dir
    atomic_write_text(out / "experiment.yaml", yaml.safe_dump(experiment.raw, sort_keys=False))
    index = pd.DataFrame([{"run_id": r.run_id, "variant": r.variant, "overrides": json.dumps(r.overrides)}
                          for r in experiment.runs])
    atomic_write(out / "index.csv", lambda tmp: index.to_csv(tmp, index=False))
