"""Figures of the searches: a threshold search's curve against the protocol's (and its Pareto front), and a
loss-weight study's objective over trials (best so far) and parameter importances.

The loss-weight figures are drawn from ``trials.csv`` alone; the importances are Optuna's (fANOVA) on an
in-memory study rebuilt from it (complete trials, the search space's distributions): no study database needed.
Each figure comes with the plotted numbers as a table (written as CSV next to it).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Fewer complete trials than this: no parameter importances (fANOVA needs several distinct points).
MIN_IMPORTANCE_TRIALS = 4
HISTORY = "optimization_history"
IMPORTANCES = "param_importances"


# --------------------------------------------------------------------------------- thresholds

def threshold_search_points(curve: pd.DataFrame, protocol: pd.DataFrame, grid: str,
                            trials: pd.DataFrame | None = None, pareto: bool = False) -> pd.DataFrame:
    """The plotted points: ``series`` (``searched``, ``protocol (<grid>)``, and with ``pareto`` the
    ``trials`` and ``Pareto front`` on the calibration split), ``split``, ``cost``, ``accuracy``."""
    frames = []
    for series, table in (("searched", curve), (f"protocol ({grid})", protocol)):
        ordered = table.sort_values("test_expected_cost", kind="stable")
        frames.append(pd.DataFrame({"series": series, "split": "test", "cost": ordered["test_expected_cost"],
                                    "accuracy": ordered["test_accuracy"]}))
    if pareto:
        done = trials[trials["state"] == "COMPLETE"] if trials is not None else pd.DataFrame()
        if not done.empty:
            frames.append(pd.DataFrame({"series": "trials", "split": "calib", "cost": done["calib_expected_cost"],
                                        "accuracy": done["calib_accuracy"]}))
        front = curve.sort_values("calib_expected_cost", kind="stable")
        frames.append(pd.DataFrame({"series": "Pareto front", "split": "calib", "cost": front["calib_expected_cost"],
                                    "accuracy": front["calib_accuracy"]}))
    return pd.concat(frames, ignore_index=True)


def plot_threshold_search(points: pd.DataFrame, title: str = "threshold search"):
    """Test accuracy against expected cost of the searched curve and the protocol's; with Pareto points,
    a second panel of every complete trial and the front on the calibration split."""
    from dynexit.analysis.figures import ACC_LABEL, COST_LABEL, new_figure

    pareto = bool((points["split"] == "calib").any())
    fig = new_figure(11.0 if pareto else 6.5, 4.2)
    axes = fig.subplots(1, 2 if pareto else 1, squeeze=False)[0]
    test = points[points["split"] == "test"]
    for (series, rows), style in zip(test.groupby("series", sort=False), ("o-", "x--")):
        axes[0].plot(rows["cost"], rows["accuracy"], style, ms=4, lw=1.4, label=series)
    axes[0].set(xlabel=COST_LABEL, ylabel=ACC_LABEL, title="test split")
    if pareto:
        calib = points[points["split"] == "calib"]
        tried = calib[calib["series"] == "trials"]
        front = calib[calib["series"] == "Pareto front"]
        axes[1].plot(tried["cost"], tried["accuracy"], ".", color="0.6", ms=3, label=f"trials ({len(tried)})")
        axes[1].plot(front["cost"], front["accuracy"], "o-", color="tab:red", ms=4, lw=1.4, label="Pareto front")
        axes[1].set(xlabel=COST_LABEL, ylabel="calibration accuracy (%)", title="calibration split")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------- loss weights

def study_from_trials(trials: pd.DataFrame):
    """An in-memory Optuna study of the complete trials of a loss-weight ``trials.csv`` (the parameters
    that vary, with the search space's distributions; the objective as value)."""
    import optuna

    from dynexit.search.loss_weights import LossWeightSpace

    space = LossWeightSpace()
    names = [c for c in trials.columns if c.startswith("weight_")] + ["distill_alpha", "distill_temperature"]
    missing = [c for c in ["number", "state", "objective", *names] if c not in trials.columns]
    if missing:
        raise ValueError(f"loss-weight trials table has no column(s) {', '.join(missing)}")
    distributions = {n: optuna.distributions.FloatDistribution(*space.weight, log=True) for n in names
                     if n.startswith("weight_")}
    distributions["distill_alpha"] = optuna.distributions.FloatDistribution(*space.distill_alpha)
    distributions["distill_temperature"] = optuna.distributions.FloatDistribution(*space.distill_temperature,
                                                                                  log=True)
    study = optuna.create_study(direction="maximize", study_name="loss-weights (from trials.csv)")
    done = trials[(trials["state"] == "COMPLETE") & trials["objective"].notna()].sort_values("number")
    names = [n for n in names if done[n].nunique() > 1]  # the last exit's weight stays 1: not searched
    for row in done.to_dict("records"):
        # values outside a range (the baseline's fixed weights may be) widen it: the table is the truth
        params = {n: float(row[n]) for n in names}
        dists = {n: _covering(distributions[n], params[n]) for n in names}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(row["objective"])))
    return study


def _covering(dist, value: float):
    import optuna

    if dist.low <= value <= dist.high:
        return dist
    return optuna.distributions.FloatDistribution(min(dist.low, value), max(dist.high, value), log=dist.log)


def optimization_history(trials: pd.DataFrame) -> pd.DataFrame:
    """Complete trials in order: ``number``, ``objective`` and ``best_so_far`` (the running maximum)."""
    done = trials[(trials["state"] == "COMPLETE") & trials["objective"].notna()].sort_values("number")
    return pd.DataFrame({"number": done["number"].astype(int).to_numpy(),
                         "objective": done["objective"].astype(float).to_numpy(),
                         "best_so_far": np.maximum.accumulate(done["objective"].astype(float).to_numpy())})


def loss_weight_figures(trials: pd.DataFrame) -> dict[str, tuple]:
    """``{name: (figure, data)}``: the objective of each complete trial (by its trial number, pruned ones
    as crosses at their last reported value) with the best so far, and (with at least
    MIN_IMPORTANCE_TRIALS complete trials) the parameters' fANOVA importances (Optuna, seed 0).

    Drawn here rather than with Optuna's matplotlib plots: a study rebuilt from the table renumbers its
    trials, and those plots' legends cover narrow axes."""
    import optuna

    from dynexit.analysis.figures import new_figure

    history = optimization_history(trials)
    out = {}
    if history.empty:
        log.info("loss-weight search: no complete trial, no figure")
        return out
    fig = new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    pruned = trials[trials["state"] == "PRUNED"]
    if "last_reported" in trials and not pruned.empty:
        ax.plot(pruned["number"], pruned["last_reported"], "x", color="0.6", label="pruned (last reported)")
    ax.plot(history["number"], history["objective"], "o", color="tab:blue", label="complete trial")
    ax.step(history["number"], history["best_so_far"], "-", where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel="objective: calibration\nbudgeted accuracy (%)",
           title=f"loss-weight search: objective over {len(trials)} trials ({len(history)} complete)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    out[HISTORY] = (fig, history)
    if len(history) < MIN_IMPORTANCE_TRIALS:
        log.info("loss-weight search: %d complete trial(s), fewer than %d: no parameter importances",
                 len(history), MIN_IMPORTANCE_TRIALS)
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study_from_trials(trials), evaluator=evaluator)
    data = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
    fig = new_figure(7.0, 0.45 * len(data) + 1.2)
    ax = fig.add_subplot()
    shown = data.iloc[::-1]
    ax.barh(shown["parameter"], shown["importance"], color="tab:blue")
    for y, value in enumerate(shown["importance"]):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize="small")
    ax.set(xlabel="importance (fANOVA, sums to 1)", xlim=(0, max(1e-9, float(data["importance"].max())) * 1.15),
           title=f"loss-weight search: parameter importances ({len(history)} complete trials)")
    ax.grid(alpha=0.3, axis="x")
    out[IMPORTANCES] = (fig, data)
    return out


