"""Curve maths on budgeted curves (expected cost, accuracy): interpolation and the mean over a cost range.

Curves are piecewise linear in (expected cost, test accuracy). They are interpolated, never
extrapolated: outside the cost range a curve covers a value is NaN.
"""
from __future__ import annotations

import numpy as np


def interpolate(x, y, at) -> np.ndarray:
    """``y(x)`` linearly interpolated at ``at``; NaN outside ``[min x, max x]`` (never extrapolated).
    Points with equal ``x`` are averaged."""
    x = np.asarray(x, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    at = np.asarray(at, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0:
        return np.full(at.shape, np.nan)
    xs, inverse = np.unique(x, return_inverse=True)
    ys = np.bincount(inverse, weights=y) / np.bincount(inverse)
    out = np.interp(at, xs, ys)
    out = np.where((at < xs[0]) | (at > xs[-1]), np.nan, out)
    return out


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
