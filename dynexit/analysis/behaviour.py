"""Exit behaviour of an experiment's runs: where test samples leave at each operating point, how accurate
the samples leaving each exit are, and how confident each exit is (from the run folders' logits)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from dynexit.analysis.results import Results, read_spec
from dynexit.policies import evaluate_thresholds, scores

log = logging.getLogger(__name__)


def exit_column(frame: pd.DataFrame, prefix: str, name: str, position: int) -> str | None:
    """``<prefix><exit name>``, or ``<prefix><exit index>`` when the curve was written without names."""
    for column in (f"{prefix}{name}", f"{prefix}{position}"):
        if column in frame.columns:
            return column
    return None


def exit_shares(results: Results) -> pd.DataFrame:
    """Share of test samples (%) leaving at each exit, per run and operating point: ``config``,
    ``run_id``, ``seed``, ``point``, ``test_expected_cost``, ``test_accuracy``, ``exit``, ``share``."""
    rows = []
    for rid in results.runs["run_id"]:
        curve, names = results.curve(rid), results.run_exits(rid)
        if len(names) < 2:  # a static run: everything leaves at its only exit
            continue
        for k, name in enumerate(names):
            column = exit_column(curve, "test_share_", name, k)
            if column is None or curve[column].isna().all():
                continue
            part = curve[["config", "run_id", "seed", "point", "test_expected_cost", "test_accuracy"]].copy()
            part["exit"], part["share"] = name, curve[column].to_numpy(dtype=float) * 100
            rows.append(part)
    columns = ["config", "run_id", "seed", "point", "test_expected_cost", "test_accuracy", "exit", "share"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def run_criterion(results: Results, run_id: str) -> str:
    """The confidence criterion a run's thresholds were set with (its config.yaml; else the spec's)."""
    config = results.run_folder(run_id) / "config.yaml"
    raw = read_spec(config) if config.is_file() else {}
    value = (raw.get("eval") or {}).get("criterion") or \
        ((results.spec.get("base") or {}).get("eval") or {}).get("criterion")
    return str(value or "max_softmax")


def load_run_logits(results: Results, run_id: str, split: str):
    from dynexit.logits import load_logits

    path = results.run_folder(run_id) / f"logits_{split}.npz"
    if not path.is_file():
        log.warning("run %s has no %s; skipped", run_id, path.name)
        return None
    return load_logits(path)


def exit_accuracy(results: Results) -> pd.DataFrame:
    """Per run, operating point and exit: the share (%) of test samples leaving there and their accuracy
    (%; NaN where none leaves), recomputed from the run's test logits and the point's thresholds.
    Columns: ``config``, ``run_id``, ``seed``, ``point``, ``test_expected_cost``, ``exit``, ``share``,
    ``accuracy``. Runs without logits or thresholds (static ones) are left out."""
    rows = []
    for run in results.runs.to_dict("records"):
        rid, names = run["run_id"], results.run_exits(run["run_id"])
        curve = results.curve(rid)
        columns = [exit_column(curve, "threshold_", n, k) for k, n in enumerate(names)]
        if len(names) < 2 or None in columns:
            continue
        loaded = load_run_logits(results, rid, "test")
        if loaded is None:
            continue
        logits, targets = loaded
        if logits.shape[0] != len(names):
            raise ValueError(f"{results.run_folder(rid)}/logits_test.npz has {logits.shape[0]} exits, "
                             f"runs.csv lists {len(names)} ({', '.join(names)})")
        conf, pred = scores(logits, run_criterion(results, rid))
        correct = pred == targets[None, :]
        costs = [run[f"gmacs_{n}"] for n in names]
        thresholds = curve[columns].to_numpy(dtype=np.float32)
        for point, cost, accuracy, th in zip(curve["point"], curve["test_expected_cost"], curve["test_accuracy"],
                                             thresholds):
            outcome = evaluate_thresholds(conf, correct, th, costs)
            if abs(outcome.accuracy - accuracy) > 1e-6:
                log.warning("run %s point %s: thresholds give %.4f %% on the test logits, the curve says "
                            "%.4f %%", rid, point, outcome.accuracy, accuracy)
            for name, share, acc in zip(names, outcome.shares, outcome.exit_accuracy):
                rows.append({"config": run["config"], "run_id": rid, "seed": run["seed"], "point": point,
                             "test_expected_cost": cost, "exit": name, "share": share * 100,
                             "accuracy": float(acc)})
    return pd.DataFrame(rows, columns=["config", "run_id", "seed", "point", "test_expected_cost", "exit",
                                       "share", "accuracy"])


def confidence_histograms(results: Results, bins: int = 20, split: str = "test") -> pd.DataFrame:
    """Histogram of the max softmax probability per configuration and exit (seeds pooled), split into
    correctly and wrongly classified samples. Columns: ``config``, ``exit``, ``bin_low``, ``bin_high``,
    ``correct``, ``wrong`` (counts), ``samples`` (all samples of that configuration and exit)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts: dict[tuple[str, str], np.ndarray] = {}
    for run in results.runs.to_dict("records"):
        loaded = load_run_logits(results, run["run_id"], split)
        if loaded is None:
            continue
        logits, targets = loaded
        conf, pred = scores(logits, "max_softmax")
        for k, name in enumerate(results.run_exits(run["run_id"])[: logits.shape[0]]):
            right = pred[k] == targets
            hist = np.stack([np.histogram(conf[k][right], edges)[0], np.histogram(conf[k][~right], edges)[0]])
            key = (run["config"], name)
            counts[key] = counts.get(key, 0) + hist
    rows = [pd.DataFrame({"config": config, "exit": name, "bin_low": edges[:-1], "bin_high": edges[1:],
                          "correct": hist[0], "wrong": hist[1], "samples": int(hist.sum())})
            for (config, name), hist in counts.items()]
    columns = ["config", "exit", "bin_low", "bin_high", "correct", "wrong", "samples"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
