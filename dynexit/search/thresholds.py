"""Exit thresholds searched with Optuna on saved per-exit logits.

Search space: one parameter ``share_<exit>`` in [0, 1] per exit but the last, the fraction of all
calibration samples whose confidence at that exit reaches its threshold; the threshold is the
``ceil(share * N)``-th largest calibration confidence of the exit (``NEVER`` for a share of 0). Working
on these quantiles makes the space the same for every criterion (max-softmax, entropy, margin) and
spends the sampler's effort where the calibration samples are. Trials are scored with
:func:`dynexit.policies.evaluate_thresholds` on the calibration split only; the chosen thresholds are
applied once to the test split.

Two searches:

* :func:`search_budgets`: one study per cost budget B, TPE maximising the calibration accuracy under the
  constraint (expected calibration cost) <= B; the curve has one row per budget, from the feasible trial
  with the highest calibration accuracy (ties: lower cost, then lower trial number).
* :func:`search_pareto`: one NSGA-II study maximising calibration accuracy and minimising expected
  calibration cost; the curve is its Pareto front on the calibration split.

Both samplers are seeded: the same seed gives the same trials (in one worker process). The curve has the
columns of :func:`dynexit.policies.budgeted_curve`; ``target_share_<exit>`` holds the calibration shares
the searched thresholds give (the search has no target shares of its own). Studies are named
``<prefix>-<criterion>-<fingerprint>-budget-<B>`` / ``...-pareto``, where the fingerprint is a hash of
the calibration confidences, correctness and costs, so that a storage never mixes trials on other data.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import optuna
import pandas as pd

from dynexit.curves import area_under_curve, interpolate
from dynexit.policies import (
    ALWAYS,
    DEFAULT_GRID,
    NEVER,
    as_costs,
    as_logits,
    as_targets,
    curve_from_scores,
    evaluate_thresholds,
    exit_labels,
    fit_temperatures,
    policy_columns,
    resolve_grid,
    scores,
)
from dynexit.search.study import SearchStorage, open_storage, open_study, run_quick_trials

log = logging.getLogger(__name__)

BUDGET_TRIALS = 200  # default trials per budget study
PARETO_TRIALS = 3000  # default trials of the Pareto study
POPULATION = 50  # NSGA-II population


@dataclass(frozen=True, eq=False)
class ThresholdProblem:
    """Confidences and correctness of both splits, ready for thousands of threshold evaluations."""

    calib_conf: np.ndarray  # (exits, calibration samples) float32
    calib_correct: np.ndarray  # (exits, calibration samples) bool
    test_conf: np.ndarray
    test_correct: np.ndarray
    costs: np.ndarray  # (exits,) cost of a sample stopping at each exit
    exit_names: tuple[str, ...]
    criterion: str
    temperatures: Optional[tuple[float, ...]]
    ranked: np.ndarray  # (exits - 1, calibration samples): each exit's calibration confidences, descending

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    @property
    def param_names(self) -> list[str]:
        return [f"share_{name}" for name in self.exit_names[:-1]]

    def thresholds(self, shares: Sequence[float]) -> np.ndarray:
        """Thresholds (float32, one per exit) of the calibration shares ``shares`` (one per exit but the last)."""
        n = self.ranked.shape[1]
        counts = np.ceil(np.asarray(shares, dtype=np.float64) * n - 1e-9).astype(np.int64).clip(0, n)
        out = np.full(self.num_exits, NEVER, dtype=np.float32)
        out[-1] = ALWAYS
        chosen = counts > 0
        out[:-1][chosen] = self.ranked[np.flatnonzero(chosen), counts[chosen] - 1]
        return out

    def shares_of(self, thresholds: Sequence[float]) -> list[float]:
        """The share parameters that give ``thresholds`` back (e.g. to compare with the protocol's)."""
        n = self.ranked.shape[1]
        return [float((self.calib_conf[k] >= t).sum() / n) if t < NEVER else 0.0
                for k, t in enumerate(np.asarray(thresholds, dtype=np.float32)[:-1])]

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for arr in (self.calib_conf, self.calib_correct, self.costs.astype(np.float64)):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(self.criterion.encode())
        return h.hexdigest()[:10]


def threshold_problem(calib_logits, calib_targets, test_logits, test_targets, costs,
                      criterion: str = "max_softmax", temperatures=None,
                      exit_names: Optional[Sequence[str]] = None) -> ThresholdProblem:
    """Scores both splits once (:func:`dynexit.policies.scores`). ``temperatures``: None, one value per
    exit, or ``"fit"`` (fitted on the calibration split)."""
    calib_logits = as_logits(calib_logits, "calib_logits")
    test_logits = as_logits(test_logits, "test_logits")
    if calib_logits.shape[0] != test_logits.shape[0] or calib_logits.shape[2] != test_logits.shape[2]:
        raise ValueError(f"calib_logits {calib_logits.shape} and test_logits {test_logits.shape} must have the "
                         "same number of exits and classes")
    num_exits, _, num_classes = calib_logits.shape
    if num_exits < 2:
        raise ValueError("a threshold search needs a model with at least 2 exits")
    calib_targets = as_targets(calib_targets, calib_logits.shape[1], num_classes, "calib_targets")
    test_targets = as_targets(test_targets, test_logits.shape[1], num_classes, "test_targets")
    costs = as_costs(costs, num_exits, exit_names)
    names = tuple(exit_labels(exit_names, num_exits))
    if isinstance(temperatures, str):
        if temperatures != "fit":
            raise ValueError(f"temperatures must be None, 'fit' or one value per exit, got {temperatures!r}")
        temperatures = fit_temperatures(calib_logits, calib_targets)
    temps = None if temperatures is None else tuple(float(t) for t in np.broadcast_to(temperatures, (num_exits,)))
    calib_conf, calib_pred = scores(calib_logits, criterion, temps)
    test_conf, test_pred = scores(test_logits, criterion, temps)
    ranked = -np.sort(-calib_conf[:-1], axis=1)
    return ThresholdProblem(calib_conf, calib_pred == calib_targets, test_conf, test_pred == test_targets, costs,
                            names, criterion, temps, ranked)


# ------------------------------------------------------------------------------------------- curves

def curve_of_thresholds(problem: ThresholdProblem, thresholds: Sequence[np.ndarray]) -> pd.DataFrame:
    """Rows of :func:`dynexit.policies.budgeted_curve`'s format for the given thresholds (one row each),
    evaluated on both splits; ``target_share_<exit>`` holds the calibration shares."""
    rows = []
    for point, t in enumerate(thresholds):
        calib = evaluate_thresholds(problem.calib_conf, problem.calib_correct, t, problem.costs)
        test = evaluate_thresholds(problem.test_conf, problem.test_correct, t, problem.costs)
        row: dict[str, float | int] = {"point": point}
        row.update({f"target_share_{n}": float(v) for n, v in zip(problem.exit_names, calib.shares)})
        row.update({f"threshold_{n}": float(v) for n, v in zip(problem.exit_names, t)})
        row.update(policy_columns(problem.criterion, problem.temperatures, problem.exit_names))
        row.update(calib_accuracy=calib.accuracy, calib_expected_cost=calib.expected_cost,
                   test_accuracy=test.accuracy, test_expected_cost=test.expected_cost)
        row.update({f"calib_share_{n}": float(v) for n, v in zip(problem.exit_names, calib.shares)})
        row.update({f"test_share_{n}": float(v) for n, v in zip(problem.exit_names, test.shares)})
        rows.append(row)
    return pd.DataFrame(rows, columns=_curve_columns(problem.exit_names))


def _curve_columns(names: Sequence[str]) -> list[str]:
    return (["point"] + [f"target_share_{n}" for n in names] + [f"threshold_{n}" for n in names]
            + ["criterion"] + [f"temperature_{n}" for n in names]
            + ["calib_accuracy", "calib_expected_cost", "test_accuracy", "test_expected_cost"]
            + [f"calib_share_{n}" for n in names] + [f"test_share_{n}" for n in names])


def protocol_curve(problem: ThresholdProblem, grid=DEFAULT_GRID) -> pd.DataFrame:
    """The budgeted protocol's curve on the same scores (:func:`dynexit.policies.curve_from_scores`)."""
    return curve_from_scores(problem.calib_conf, problem.calib_correct, problem.test_conf, problem.test_correct,
                             problem.costs, grid, problem.exit_names, problem.criterion, problem.temperatures)


def protocol_budgets(problem: ThresholdProblem, grid=DEFAULT_GRID) -> list[float]:
    """The distinct expected calibration costs of the protocol's operating points (budgets that put one
    searched point at each protocol point)."""
    return sorted(set(protocol_curve(problem, resolve_grid(grid, problem.num_exits))["calib_expected_cost"]))


def compare_with_protocol(curve: pd.DataFrame, protocol: pd.DataFrame) -> pd.DataFrame:
    """At the test cost of every protocol point: the protocol's test accuracy, the searched curve's
    (:func:`dynexit.curves.interpolate`: NaN outside its cost range, never extrapolated; of equal-cost
    points the most accurate) and the difference. ``attrs``: ``min_difference``, ``mean_difference`` (over the
    points in range), ``area_difference`` (mean difference of the two interpolated curves over their
    shared test-cost range) and ``points_in_range``."""
    x, y = curve["test_expected_cost"], curve["test_accuracy"]
    px, py = protocol["test_expected_cost"], protocol["test_accuracy"]
    cost = px.to_numpy(float)
    searched = interpolate(x, y, cost)
    out = pd.DataFrame({"point": protocol["point"].to_numpy() if "point" in protocol else np.arange(len(cost)),
                        "test_expected_cost": cost, "protocol_test_accuracy": protocol["test_accuracy"].to_numpy(float),
                        "searched_test_accuracy": searched})
    out["difference"] = out["searched_test_accuracy"] - out["protocol_test_accuracy"]
    diff = out["difference"].dropna()
    area = np.nan
    if len(x) and len(px):  # mean over the shared cost range (NaN when there is none)
        lo, hi = max(np.nanmin(x), np.nanmin(px)), min(np.nanmax(x), np.nanmax(px))
        area = area_under_curve(x, y, lo, hi) - area_under_curve(px, py, lo, hi)
    out.attrs.update(min_difference=float(diff.min()) if len(diff) else np.nan,
                     mean_difference=float(diff.mean()) if len(diff) else np.nan,
                     area_difference=area, points_in_range=int(len(diff)))
    return out


def compare_at_budgets(result: ThresholdSearch, protocol: pd.DataFrame) -> pd.DataFrame:
    """Per budget of a budget search: the searched point's test accuracy against the protocol point the same
    rule picks within the budget (highest calibration accuracy among the points whose calibration cost is
    within it; ties to the lower cost, then the earlier point), and the difference in points. Columns:
    ``budget``, ``searched_point``, ``searched_calib_cost``, ``searched_test_accuracy``, ``protocol_point``,
    ``protocol_calib_cost``, ``protocol_test_accuracy``, ``difference`` (searched minus protocol; NaN where
    either has no point within the budget)."""
    from dynexit.policies import row_within_budget

    trials = result.trials
    if "budget" not in trials or trials["budget"].isna().all():
        raise ValueError("not a budget search: its trials have no budget")
    rows = []
    for budget in sorted(trials["budget"].dropna().unique()):
        chosen = trials[(trials["budget"] == budget) & trials["point"].notna()]
        row = {"budget": float(budget), "searched_point": np.nan, "searched_calib_cost": np.nan,
               "searched_test_accuracy": np.nan, "protocol_point": np.nan, "protocol_calib_cost": np.nan,
               "protocol_test_accuracy": np.nan}
        if len(chosen):
            point = result.curve.iloc[int(chosen["point"].iloc[0])]
            row.update(searched_point=int(chosen["point"].iloc[0]), searched_calib_cost=point["calib_expected_cost"],
                       searched_test_accuracy=point["test_accuracy"])
        if (protocol["calib_expected_cost"] <= budget).any():
            best = row_within_budget(protocol, float(budget), "protocol")
            row.update(protocol_point=int(best["point"]), protocol_calib_cost=best["calib_expected_cost"],
                       protocol_test_accuracy=best["test_accuracy"])
        rows.append(row)
    out = pd.DataFrame(rows)
    out["difference"] = out["searched_test_accuracy"] - out["protocol_test_accuracy"]
    return out


def budget_verdict(row) -> str:
    """One line on a row of :func:`compare_at_budgets`: whether the search beat the protocol, and by how much."""
    if np.isnan(row["searched_test_accuracy"]):
        return "no searched point within the budget (no trial met it)"
    if np.isnan(row["protocol_test_accuracy"]):
        return (f"search {row['searched_test_accuracy']:.2f} %; the protocol has no point within the budget, "
                "so the search wins by default")
    diff = row["difference"]
    outcome = ("beat the protocol by" if diff > 0 else "lost to the protocol by" if diff < 0
               else "tied with the protocol:")
    return (f"search {row['searched_test_accuracy']:.2f} % (calib cost {row['searched_calib_cost']:.4g}) vs "
            f"protocol {row['protocol_test_accuracy']:.2f} % (point {int(row['protocol_point'])}, calib cost "
            f"{row['protocol_calib_cost']:.4g}): {outcome} {diff:+.2f} points")


# ------------------------------------------------------------------------------------------ searches

@dataclass
class ThresholdSearch:
    """Outcome of a threshold search."""

    curve: pd.DataFrame  # budgeted_curve's columns, one row per chosen set of thresholds
    trials: pd.DataFrame  # one row per trial of every study (calibration figures only)
    studies: list[str]
    added: int  # trials this process added to the studies (the others come from other workers or earlier runs)


def _study_name(problem: ThresholdProblem, prefix: str, suffix: str) -> str:
    return f"{prefix}-{problem.criterion}-{problem.fingerprint()}-{suffix}"


def _study_attrs(problem: ThresholdProblem, kind: str, budget: Optional[float] = None) -> dict:
    attrs = {"kind": kind, "criterion": problem.criterion, "exit_names": list(problem.exit_names),
             "costs": [float(c) for c in problem.costs], "fingerprint": problem.fingerprint(),
             "calibration_samples": int(problem.calib_conf.shape[1])}
    if budget is not None:
        attrs["budget"] = float(budget)
    return attrs


def _suggest(problem: ThresholdProblem, trial: optuna.Trial) -> np.ndarray:
    return problem.thresholds([trial.suggest_float(name, 0.0, 1.0) for name in problem.param_names])


def _as_storage(storage) -> SearchStorage:
    return storage if isinstance(storage, SearchStorage) else open_storage(storage)


def search_budgets(problem: ThresholdProblem, budgets: Sequence[float], n_trials: int = BUDGET_TRIALS,
                   storage: SearchStorage | str | None = None, seed: int = 0,
                   study_prefix: str = "thresholds") -> ThresholdSearch:
    """For each budget, the thresholds of highest calibration accuracy whose expected calibration cost
    stays within it (one TPE study of ``n_trials`` finished trials per budget; see the module docstring).
    ``storage``: None (in memory), a URL, or an open :class:`SearchStorage`."""
    values = np.asarray(list(budgets), dtype=np.float64).reshape(-1)
    if len(values) == 0 or not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"budgets must be positive numbers, got {values.tolist()}")
    storage = _as_storage(storage)
    chosen, frames, names, added = [], [], [], 0
    for budget in np.unique(values):
        name = _study_name(problem, study_prefix, f"budget-{budget:.10g}")
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
        study = open_study(storage, name, ["maximize"], sampler, attrs=_study_attrs(problem, "budget", budget))

        def objective(trial: optuna.Trial, budget: float = float(budget)) -> float:
            result = evaluate_thresholds(problem.calib_conf, problem.calib_correct, _suggest(problem, trial),
                                         problem.costs)
            trial.set_constraint("expected_cost_over_budget", result.expected_cost - budget)
            return result.accuracy

        added += run_quick_trials(storage, study, objective, n_trials, sampler, desc=f"budget {budget:.4g}")
        table = _trials_table(problem, study, budget)
        feasible = table[(table["state"] == "COMPLETE") & table["feasible"]]
        if feasible.empty:
            cheapest = float(problem.costs[0])
            log.warning("budget %.6g: no trial within it (the cheapest operating point costs %.6g)", budget, cheapest)
        else:
            best = feasible.sort_values(["calib_accuracy", "calib_expected_cost", "number"],
                                        ascending=[False, True, True], kind="stable").iloc[0]
            chosen.append((name, int(best["number"]), _row_thresholds(problem, best)))
        frames.append(table)
        names.append(name)
    return _finish(problem, chosen, frames, names, added)


def search_pareto(problem: ThresholdProblem, n_trials: int = PARETO_TRIALS,
                  storage: SearchStorage | str | None = None, seed: int = 0, population_size: int = POPULATION,
                  study_prefix: str = "thresholds") -> ThresholdSearch:
    """The Pareto front of calibration accuracy against expected calibration cost (one NSGA-II study of
    ``n_trials`` finished trials); the curve has one row per front point, by increasing cost."""
    storage = _as_storage(storage)
    name = _study_name(problem, study_prefix, "pareto")
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    study = open_study(storage, name, ["maximize", "minimize"], sampler, attrs=_study_attrs(problem, "pareto"))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        result = evaluate_thresholds(problem.calib_conf, problem.calib_correct, _suggest(problem, trial),
                                     problem.costs)
        return result.accuracy, result.expected_cost

    added = run_quick_trials(storage, study, objective, n_trials, sampler, desc="pareto")
    table = _trials_table(problem, study, None)
    done = table[table["state"] == "COMPLETE"].sort_values(
        ["calib_expected_cost", "calib_accuracy", "number"], ascending=[True, False, True], kind="stable")
    chosen, best = [], -np.inf
    for _, row in done.iterrows():  # increasing cost: a point is on the front if it beats every cheaper one
        if row["calib_accuracy"] > best:
            best = row["calib_accuracy"]
            chosen.append((name, int(row["number"]), _row_thresholds(problem, row)))
    return _finish(problem, chosen, [table], [name], added)


def _row_thresholds(problem: ThresholdProblem, row: pd.Series) -> np.ndarray:
    return np.array([row[f"threshold_{n}"] for n in problem.exit_names], dtype=np.float32)


def _trials_table(problem: ThresholdProblem, study: optuna.Study, budget: Optional[float]) -> pd.DataFrame:
    """One row per trial: state, parameters, thresholds and calibration figures (recomputed from the
    parameters, so that the table never depends on what a worker stored)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"study": study.study_name, "budget": budget if budget is not None else np.nan,
               "number": t.number, "state": t.state.name}
        shares = [t.params.get(n) for n in problem.param_names]
        row.update({n: (np.nan if s is None else s) for n, s in zip(problem.param_names, shares)})
        if t.state == optuna.trial.TrialState.COMPLETE and None not in shares:
            thresholds = problem.thresholds(shares)
            calib = evaluate_thresholds(problem.calib_conf, problem.calib_correct, thresholds, problem.costs)
            row.update({f"threshold_{n}": float(v) for n, v in zip(problem.exit_names, thresholds)})
            row.update(calib_accuracy=calib.accuracy, calib_expected_cost=calib.expected_cost)
            row["feasible"] = budget is None or calib.expected_cost <= budget
        rows.append(row)
    columns = (["study", "budget", "number", "state"] + problem.param_names
               + [f"threshold_{n}" for n in problem.exit_names] + ["calib_accuracy", "calib_expected_cost", "feasible"])
    table = pd.DataFrame(rows, columns=columns)
    table["feasible"] = table["feasible"].astype("boolean").fillna(False).astype(bool)
    return table


def _finish(problem: ThresholdProblem, chosen: list, frames: list[pd.DataFrame], names: list[str],
            added: int) -> ThresholdSearch:
    curve = curve_of_thresholds(problem, [t for _, _, t in chosen])
    trials = pd.concat(frames, ignore_index=True)
    trials["point"] = pd.array([pd.NA] * len(trials), dtype="Int64")
    for point, (study, number, _) in enumerate(chosen):
        trials.loc[(trials["study"] == study) & (trials["number"] == number), "point"] = point
    return ThresholdSearch(curve, trials, names, added)
