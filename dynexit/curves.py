"""Curve maths on budgeted curves (expected cost, accuracy): the one copy the pipeline, the analysis and the
searches call.

A budgeted curve is a set of operating points (expected cost per sample, accuracy). Between points it is
read piecewise linearly; outside the cost range its points cover it is undefined (NaN): never
extrapolated. Non-finite points are ignored.

Points of equal cost: the curve keeps the most accurate one (its upper envelope at that cost). A budgeted
curve answers "what accuracy does this cost buy?": two operating points at one cost are two choices of
thresholds for the same budget, and a user takes the better one. The straight segment between two
operating points is what mixing their thresholds at random achieves (expected cost and accuracy both mix
linearly), so the segments must start from the better point too. Averaging the two (or keeping whichever
one a sort happens to leave last) reports an accuracy no choice of thresholds improves on and that
depends on how many weaker points share the cost.

:func:`mean_best_within_budget` is a different reading, for objectives: at each budget the best accuracy
of any point that costs no more (a staircase that never decreases).
"""
from __future__ import annotations

import numpy as np


def envelope_points(x, y) -> tuple[np.ndarray, np.ndarray]:
    """The curve's points sorted by cost, one per distinct cost (the most accurate one), non-finite ones
    dropped: ``(costs, accuracies)`` as float arrays."""
    x = np.asarray(x, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    xs, inverse = np.unique(x, return_inverse=True)
    ys = np.full(len(xs), -np.inf)
    np.maximum.at(ys, inverse, y)
    return xs, ys


def interpolation_points(x, y, at) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which points :func:`interpolate` reads at each value of ``at``: ``(lower, upper, weight)``, the
    positions in ``x`` of the two envelope points around it and the weight of the upper one, so that
    ``interpolate(x, y, at) == (1 - weight) * y[lower] + weight * y[upper]``. Outside the curve's cost
    range: positions -1 and weight NaN. (A bootstrap reads per-sample outcomes of these two points.)"""
    x = np.asarray(x, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    at = np.asarray(at, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    order = ok[np.lexsort((-y[ok], x[ok]))]  # by cost, the most accurate first among equal costs
    keep = order[np.r_[True, np.diff(x[order]) > 0]] if len(order) else order  # the envelope's points
    lower = np.full(at.shape, -1, dtype=np.int64)
    upper = np.full(at.shape, -1, dtype=np.int64)
    weight = np.full(at.shape, np.nan)
    if len(keep) == 0:
        return lower, upper, weight
    xs = x[keep]
    inside = (at >= xs[0]) & (at <= xs[-1])
    j = np.clip(np.searchsorted(xs, at[inside], side="right") - 1, 0, max(len(xs) - 2, 0))
    k = np.minimum(j + 1, len(xs) - 1)
    span = xs[k] - xs[j]
    lower[inside], upper[inside] = keep[j], keep[k]
    weight[inside] = np.where(span > 0, (at[inside] - xs[j]) / np.where(span > 0, span, 1.0), 0.0)
    return lower, upper, weight


def interpolate(x, y, at) -> np.ndarray:
    """``y(x)`` linearly interpolated at ``at``; NaN outside ``[min x, max x]`` (never extrapolated).
    Of points with equal ``x`` the largest ``y`` counts (see the module docstring)."""
    at = np.asarray(at, dtype=float)
    xs, ys = envelope_points(x, y)
    if len(xs) == 0:
        return np.full(at.shape, np.nan)
    out = np.interp(at, xs, ys)
    return np.where((at < xs[0]) | (at > xs[-1]), np.nan, out)


def accuracy_at_budget(x, y, budget: float) -> float:
    """The curve's accuracy at cost ``budget`` (:func:`interpolate`); NaN outside its cost range."""
    return float(interpolate(x, y, float(budget)))


def area_under_curve(x, y, low: float, high: float) -> float:
    """Mean of the piecewise-linear curve ``y(x)`` over ``[low, high]``: its integral divided by
    ``high - low`` (so it reads as a mean accuracy). NaN when the curve does not cover the range."""
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        return float("nan")
    x = np.asarray(x, dtype=float)
    inner = np.unique(x[np.isfinite(x) & (x > low) & (x < high)])
    knots = np.concatenate([[low], inner, [high]])
    values = interpolate(x, y, knots)
    if np.isnan(values).any():
        return float("nan")
    return float(np.trapezoid(values, knots) / (high - low))


def mean_best_within_budget(x, y, low: float, high: float) -> float:
    """Mean over budgets in ``[low, high]`` of the best accuracy among points costing at most the budget:
    the integral of that staircase divided by ``high - low``. Below the cheapest point there is none, so
    ``low`` must not be below it (ValueError)."""
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"cost range must be two increasing finite numbers, got ({low}, {high})")
    cost, acc = envelope_points(x, y)
    if len(cost) == 0 or low < cost[0]:
        first = f"{cost[0]:g}" if len(cost) else "none"
        raise ValueError(f"cost range starts at {low:g}, below the cheapest operating point ({first})")
    best = np.maximum.accumulate(acc)  # the best within each budget
    edges = np.clip(np.append(cost, np.inf), low, high)  # segment i: [cost_i, cost_{i+1}) at best_i
    return float(np.sum(best * np.diff(edges)) / (high - low))
