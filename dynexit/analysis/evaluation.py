"""How an experiment's runs were evaluated: the confidence criterion, the grid of target shares, the
calibration size and the temperatures behind each curve, as recorded in the run folders and curves, so that
every report states them (header, table notes, figure captions).

Sources, per run: the curve's ``criterion`` and ``temperature_<exit>`` columns (what the thresholds were set
with), the run's ``eval.json`` (``outputs.grid``, written when the run was evaluated) else its
``config.yaml`` (``eval.grid``) else the spec's ``base.eval``, and the calibration size from the run's
``logits_calib.npz`` (its targets) else ``data.calib_size``.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from dynexit.analysis.results import Results, read_spec

UNKNOWN = "not recorded"


def run_evaluations(results: Results) -> pd.DataFrame:
    """One row per run: ``config``, ``run_id``, ``criterion``, ``grid``, ``calib_size`` (0 when unknown) and
    ``temperature`` (``none`` or ``fitted``). A static run has no curve to evaluate:
    criterion, grid and temperature are empty."""
    base = (results.spec.get("base") or {}).get("eval") or {}
    rows = []
    for run in results.runs.to_dict("records"):
        rid = run["run_id"]
        folder = results.run_folder(rid)
        config = read_spec(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
        outputs = _eval_outputs(folder / "eval.json")
        static = len(results.run_exits(rid)) < 2
        curve = results.curve(rid)
        criterion = grid = temperature = ""
        if not static:
            recorded = curve["criterion"].dropna() if "criterion" in curve else pd.Series(dtype=object)
            criterion = str(recorded.iloc[0]) if len(recorded) else str(
                outputs.get("criterion") or (config.get("eval") or {}).get("criterion") or base.get("criterion")
                or UNKNOWN)
            grid = str(outputs.get("grid") or (config.get("eval") or {}).get("grid") or base.get("grid") or UNKNOWN)
            temps = [c for c in curve.columns if c.startswith("temperature_")]
            # a curve without temperature columns predates them: written without a temperature
            temperature = "fitted" if temps and curve[temps].notna().any().any() else "none"
        rows.append({"config": run["config"], "run_id": rid, "criterion": criterion, "grid": grid,
                     "calib_size": _calib_size(folder, config), "temperature": temperature})
    return pd.DataFrame(rows, columns=["config", "run_id", "criterion", "grid", "calib_size", "temperature"])


def _eval_outputs(path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    outputs = record.get("outputs") if isinstance(record, dict) else None
    return outputs if isinstance(outputs, dict) else {}


def _calib_size(folder, config: dict) -> int:
    path = folder / "logits_calib.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if "targets" in data.files:
                return int(data["targets"].shape[0])
    size = (config.get("data") or {}).get("calib_size")
    try:
        return int(float(size)) if size is not None else 0
    except (TypeError, ValueError):
        return 0


def describe_evaluation(results: Results) -> str:
    """One sentence stating how the curves were evaluated: criterion, grid, calibration size and temperature,
    each with the configurations it applies to when they differ."""
    table = run_evaluations(results)
    curved = table[table["criterion"] != ""]
    if curved.empty:
        sizes = sorted({s for s in table["calib_size"] if s})
        return "Evaluation: no multi-exit run (no budgeted curve)" + (
            f"; calibration {', '.join(str(s) for s in sizes)} images." if sizes else ".")
    parts = [_part(curved, "criterion", "criterion", str),
             _part(curved, "grid", "grid", str),
             _part(curved, "calib_size", "calibration", lambda v: f"{v} images" if v else UNKNOWN),
             _part(curved, "temperature", "temperature", lambda v: {"none": "none", "fitted": "fitted per exit on "
                                                                    "the calibration split"}.get(v, v))]
    return "Evaluation of the budgeted curves: " + "; ".join(parts) + "."


def _part(table: pd.DataFrame, column: str, label: str, show) -> str:
    values = list(dict.fromkeys(table[column]))
    if len(values) == 1:
        return f"{label} {show(values[0])}"
    per_value = [f"{show(v)} ({', '.join(dict.fromkeys(table.loc[table[column] == v, 'config']))})" for v in values]
    return f"{label} " + ", ".join(per_value)
