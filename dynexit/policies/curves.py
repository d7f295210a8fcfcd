"""Budgeted accuracy curves and anytime accuracies from per-exit logits."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dynexit.policies.checks import as_costs, as_logits, as_targets, as_temperatures, exit_labels
from dynexit.policies.criteria import check_criterion, fit_temperatures, scores
from dynexit.policies.grids import DEFAULT_GRID, resolve_grid
from dynexit.policies.thresholds import evaluate_thresholds, find_thresholds

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def policy_columns(criterion: str, temperatures, exit_names: Sequence[str]) -> dict[str, str | float]:
    """The columns that make a curve row a complete :class:`ExitPolicy` besides its thresholds: ``criterion``
    and ``temperature_<exit>`` (NaN, an empty CSV cell, when the confidences used no temperature)."""
    check_criterion(criterion)
    temps = as_temperatures(temperatures, len(exit_names))
    columns: dict[str, str | float] = {"criterion": criterion}
    columns.update({f"temperature_{n}": (np.nan if temps is None else float(t))
                    for n, t in zip(exit_names, temps if temps is not None else [None] * len(exit_names))})
    return columns


def curve_from_scores(calib_conf: np.ndarray, calib_correct: np.ndarray, test_conf: np.ndarray,
                      test_correct: np.ndarray, costs, grid=DEFAULT_GRID,
                      exit_names: Sequence[str] | None = None, criterion: str = "max_softmax",
                      temperatures=None) -> pd.DataFrame:
    """:func:`budgeted_curve` on precomputed confidences and correctness (exits, samples); ``criterion`` and
    ``temperatures`` are those the confidences were computed with (written to every row)."""
    import pandas as pd

    if np.shape(calib_conf)[0] != np.shape(test_conf)[0]:
        raise ValueError(f"calibration has {np.shape(calib_conf)[0]} exits but test has "
                         f"{np.shape(test_conf)[0]}")
    num_exits = np.shape(calib_conf)[0]
    costs = as_costs(costs, num_exits, exit_names)
    names = exit_labels(exit_names, num_exits)
    shares = resolve_grid(grid, num_exits)
    policy = policy_columns(criterion, temperatures, names)
    rows = []
    for point, p in enumerate(shares):
        thresholds = find_thresholds(calib_conf, p)
        calib = evaluate_thresholds(calib_conf, calib_correct, thresholds, costs)
        test = evaluate_thresholds(test_conf, test_correct, thresholds, costs)
        row: dict[str, float | int] = {"point": point}
        row.update({f"target_share_{n}": float(v) for n, v in zip(names, p)})
        row.update({f"threshold_{n}": float(v) for n, v in zip(names, thresholds)})
        row.update(policy)
        row.update(calib_accuracy=calib.accuracy, calib_expected_cost=calib.expected_cost,
                   test_accuracy=test.accuracy, test_expected_cost=test.expected_cost)
        row.update({f"calib_share_{n}": float(v) for n, v in zip(names, calib.shares)})
        row.update({f"test_share_{n}": float(v) for n, v in zip(names, test.shares)})
        rows.append(row)
    return pd.DataFrame(rows)


def budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, costs,
                   grid: str | np.ndarray = DEFAULT_GRID, criterion: str = "max_softmax",
                   temperatures: str | Sequence[float] | np.ndarray | None = None,
                   exit_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Budgeted-batch curve: one row per operating point of ``grid`` (``"full"``, the default: every budget
    from the first exit to the last; ``"official"`` or ``"msdnet"``, the papers' grids; or a (points,
    exits) array of target shares), thresholds set on the calibration split and applied
    to the test split. Columns: see the module docstring.

    ``costs``: per-exit cost of a sample that stops there (cumulative, e.g. GMACs). ``temperatures``:
    None, one value per exit, or ``"fit"`` to fit them on the calibration split
    (:func:`fit_temperatures`); the fitted values are in ``df.attrs["temperatures"]``.
    """
    calib_logits, test_logits = as_logits(calib_logits, "calib_logits"), as_logits(test_logits, "test_logits")
    if calib_logits.shape[0] != test_logits.shape[0] or calib_logits.shape[2] != test_logits.shape[2]:
        raise ValueError(f"calib_logits {calib_logits.shape} and test_logits {test_logits.shape} must have "
                         "the same number of exits and classes")
    num_exits, _, num_classes = calib_logits.shape
    calib_targets = as_targets(calib_targets, calib_logits.shape[1], num_classes, "calib_targets")
    test_targets = as_targets(test_targets, test_logits.shape[1], num_classes, "test_targets")
    costs = as_costs(costs, num_exits, exit_names)
    if isinstance(temperatures, str):
        if temperatures != "fit":
            raise ValueError(f"temperatures must be None, 'fit' or one value per exit, got {temperatures!r}")
        temperatures = fit_temperatures(calib_logits, calib_targets)
        log.info("fitted temperatures: %s", ", ".join(f"{t:.3f}" for t in temperatures))
    temperatures = as_temperatures(temperatures, num_exits)
    calib_conf, calib_pred = scores(calib_logits, criterion, temperatures)
    test_conf, test_pred = scores(test_logits, criterion, temperatures)
    curve = curve_from_scores(calib_conf, calib_pred == calib_targets, test_conf, test_pred == test_targets,
                              costs, grid, exit_names, criterion, temperatures)
    curve.attrs.update(criterion=criterion,
                       temperatures=None if temperatures is None else temperatures.tolist())
    return curve


def anytime_accuracy(logits, targets, costs, exit_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Each exit on its own (anytime prediction): one row per exit with columns ``exit`` (name, or
    0-based index), ``cost`` and ``accuracy`` (percent)."""
    import pandas as pd

    arr = as_logits(logits)
    num_exits, num_samples, num_classes = arr.shape
    y = as_targets(targets, num_samples, num_classes)
    costs = as_costs(costs, num_exits, exit_names)
    _, pred = scores(arr)
    accuracy = (pred == y).sum(axis=1) * 100.0 / num_samples
    return pd.DataFrame({"exit": exit_labels(exit_names, num_exits), "cost": costs, "accuracy": accuracy})
