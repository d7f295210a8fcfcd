"""Thresholds of the budgeted protocol (official float32 arithmetic) and the policy they define on a split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynexit.policies.checks import as_costs

NEVER = np.float32(1e8)  # threshold of an exit nobody leaves at
ALWAYS = np.float32(-1e8)  # threshold of the last exit: everyone left leaves there


def assign_exits(conf: np.ndarray, thresholds) -> np.ndarray:
    """Exit index (int64, one per sample) of confidences ``conf`` (exits, samples): the first exit k
    with ``conf[k] >= thresholds[k]``; the last exit takes everyone left (its threshold is ignored)."""
    conf = np.asarray(conf)
    thresholds = np.asarray(thresholds)
    if conf.ndim != 2 or thresholds.shape != (conf.shape[0],):
        raise ValueError(f"need conf (exits, samples) and one threshold per exit, got conf {conf.shape} "
                         f"and thresholds {thresholds.shape}")
    num_exits = conf.shape[0]
    exits = np.full(conf.shape[1], num_exits - 1, dtype=np.int64)
    for k in range(num_exits - 2, -1, -1):  # backwards: the earliest qualifying exit wins
        exits[conf[k] >= thresholds[k]] = k
    return exits


def find_thresholds(conf: np.ndarray, proportions) -> np.ndarray:
    """Thresholds (float32, one per exit) of the budgeted protocol for target shares ``proportions``
    on calibration confidences ``conf`` (exits, samples); see the module docstring.

    The shares are taken in float32 and n_k = floor(float32(N) * p_k) is computed in float32, as the
    official code does, so that n_k (and hence the threshold) is the official one.
    """
    conf = np.asarray(conf)
    if conf.ndim != 2:
        raise ValueError(f"conf must have shape (exits, samples), got {conf.shape}")
    num_exits, num_samples = conf.shape
    p = np.asarray(proportions, dtype=np.float32).reshape(-1)
    if len(p) != num_exits:
        raise ValueError(f"proportions has {len(p)} values but there are {num_exits} exits")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"proportions must be finite and non-negative, got {p.tolist()}")
    wanted = np.floor(np.float32(num_samples) * p).astype(np.int64)
    thresholds = np.full(num_exits, NEVER, dtype=np.float32)
    thresholds[-1] = ALWAYS
    remaining = np.ones(num_samples, dtype=bool)
    for k in range(num_exits - 1):
        candidates = conf[k][remaining]
        n = int(wanted[k])
        if 0 < n == len(candidates):
            thresholds[k] = ALWAYS  # everyone left leaves here, also test samples below the calibration minimum
        elif 0 < n < len(candidates):
            # the n-th largest = the (len - n)-th smallest; ties give the same value in any order
            thresholds[k] = np.partition(candidates, len(candidates) - n)[len(candidates) - n]
        remaining &= ~(conf[k] >= thresholds[k])
    return thresholds


@dataclass(frozen=True)
class SplitResult:
    """Outcome of thresholds on one split.

    accuracy: percent of all samples classified correctly at their exit.
    expected_cost: sum over exits of (share exiting there) * cost.
    shares: (exits,) fraction of samples exiting at each exit.
    exit_accuracy: (exits,) percent correct among the samples exiting there (NaN where none do).
    """

    accuracy: float
    expected_cost: float
    shares: np.ndarray
    exit_accuracy: np.ndarray


def evaluate_thresholds(conf: np.ndarray, correct: np.ndarray, thresholds, costs) -> SplitResult:
    """Applies ``thresholds`` to one split with precomputed confidences ``conf`` and correctness
    ``correct`` (both (exits, samples); ``correct = pred == targets``). Cheap enough to call
    thousands of times a minute on ImageNet-sized splits (no softmax, no sort).

    ``expected_cost`` follows the official float32 arithmetic (float32 shares times float32 costs,
    summed in exit order in float32), so it equals the official figure bit for bit.
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.shape != np.shape(conf):
        raise ValueError(f"correct {correct.shape} and conf {np.shape(conf)} must have the same shape")
    num_exits, num_samples = correct.shape
    costs = as_costs(costs, num_exits)
    exits = assign_exits(conf, thresholds)
    hit = correct.reshape(-1)[exits * num_samples + np.arange(num_samples)]
    counts = np.bincount(exits, minlength=num_exits)
    right = np.bincount(exits, weights=hit, minlength=num_exits)
    shares32 = counts.astype(np.float32) / np.float32(num_samples)
    total = np.float32(0.0)
    for term in shares32 * costs.astype(np.float32):
        total = np.float32(total + term)
    with np.errstate(invalid="ignore", divide="ignore"):
        exit_accuracy = right * 100.0 / counts
    return SplitResult(accuracy=int(right.sum()) * 100.0 / num_samples, expected_cost=float(total),
                       shares=counts / num_samples, exit_accuracy=exit_accuracy)
