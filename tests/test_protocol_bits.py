"""The budgeted protocol to the bit, on sample counts where float32 and float64 arithmetic disagree.

The official protocol computes n_k = floor(N * p_k) with p_k a float32 tensor (a float32 product) and the
expected cost as a float32 sum of float32 shares times the costs. For N = 1,000 (the reference fixture)
float64 gives the same counts; for N = 160 or 1,120 it does not (at the two q = 1 points of the official
grid, exit 2). The reference below follows the protocol's description (/work/shared/reference, section 5
of the official SPEC) step by step, one sample at a time, in torch float32; dynexit must equal it with
``==``: thresholds, the samples leaving at each exit, accuracies and expected costs.
"""
import math

import numpy as np
import pytest
import torch

from dynexit.policies import budgeted_curve, official_grid

COSTS = (0.4591, 1.0649, 1.2276, 1.298)  # the official reg800m costs (GMACs)
CLASSES = 10


def reference_thresholds(conf: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """For exits 0..K-2: n_k = floor(N * p_k) (a float32 product), the confidence of the n_k-th most
    confident sample not yet exited (1e8 if n_k is 0 or not reached); then everyone at or above it exits."""
    num_exits, n = conf.shape
    thresholds = torch.full((num_exits,), 1e8)
    exited = torch.zeros(n, dtype=torch.bool)
    for k in range(num_exits - 1):
        wanted = math.floor(n * p[k])  # 0-d float32 tensor times int: float32
        count = 0
        for i in torch.argsort(conf[k], descending=True).tolist():
            if not exited[i]:
                count += 1
                if count == wanted:
                    thresholds[k] = conf[k, i]
                    break
        exited |= conf[k] >= thresholds[k]
    thresholds[-1] = -1e8
    return thresholds


def reference_split(conf: torch.Tensor, correct: torch.Tensor, thresholds: torch.Tensor):
    """Each sample stops at the first exit whose confidence is >= its threshold; expected cost = sum of
    (float32 share exiting at k) * cost_k, accumulated in float32. Returns (accuracy %, cost, counts)."""
    num_exits, n = conf.shape
    stops = (conf >= thresholds[:, None]).to(torch.int8).argmax(dim=0)  # the first exit at or above
    right = int(correct[stops, torch.arange(n)].sum())
    counts = torch.bincount(stops, minlength=num_exits).float()  # float32, as the official counters
    expected = 0
    for k in range(num_exits):
        expected = expected + (1.0 * counts[k] / n) * COSTS[k]
    assert expected.dtype == torch.float32
    return right * 100.0 / n, float(expected), counts.to(torch.int64).tolist()


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-exit logits (4, n, 10) that grow more confident with the exit, and targets."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, CLASSES, n)
    logits = rng.normal(size=(4, n, CLASSES)) * np.array([1.0, 1.5, 2.0, 2.5])[:, None, None]
    logits[:, np.arange(n), targets] += np.array([0.5, 1.0, 1.5, 2.0])[:, None]
    return logits.astype(np.float32), targets


def scores(logits: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    probs = [torch.softmax(torch.from_numpy(np.ascontiguousarray(z)), dim=-1) for z in logits]
    conf = torch.stack([p.max(dim=-1).values for p in probs])
    correct = torch.stack([p.argmax(dim=-1) == torch.from_numpy(targets) for p in probs])
    return conf, correct


@pytest.mark.parametrize("n", [160, 1120])
def test_official_protocol_to_the_bit_where_float32_and_float64_differ(n):
    grid = official_grid()
    # The fixture separates the two arithmetics: float64 would exit other samples at some point.
    n32 = np.floor(np.float32(n) * grid)
    n64 = np.floor(np.float64(n) * grid.astype(np.float64))
    assert (n32 != n64).any()
    calib, test = make_split(n, seed=n), make_split(n, seed=n + 1)
    curve = budgeted_curve(*calib, *test, COSTS, grid="official")
    calib_conf, calib_correct = scores(*calib)
    test_conf, test_correct = scores(*test)
    names = range(4)
    float64_costs_differ = 0
    for point, p in enumerate(grid):
        row = curve.iloc[point]
        thresholds = reference_thresholds(calib_conf, torch.from_numpy(p))
        assert np.array_equal(row[[f"threshold_{k}" for k in names]].to_numpy(np.float32), thresholds.numpy()), point
        for split, conf, correct in (("calib", calib_conf, calib_correct), ("test", test_conf, test_correct)):
            accuracy, cost, counts = reference_split(conf, correct, thresholds)
            assert row[f"{split}_accuracy"] == accuracy, (point, split)
            assert row[f"{split}_expected_cost"] == cost, (point, split)
            assert [round(row[f"{split}_share_{k}"] * n) for k in names] == counts, (point, split)
            float64_costs_differ += float(np.dot(np.array(counts) / n, COSTS)) != cost
    assert float64_costs_differ > 0  # a float64 sum would not pass these comparisons


@pytest.mark.parametrize("n", [160, 1120])
def test_a_float64_sample_count_would_pick_another_threshold(n):
    """At the q = 1 points, float64's n_k exceeds float32's by one at exit 2, and the threshold moves."""
    grid = official_grid()
    calib_conf, _ = scores(*make_split(n, seed=n))
    differ = np.floor(np.float32(n) * grid) != np.floor(np.float64(n) * grid.astype(np.float64))
    (point, exit_k), *_ = np.argwhere(differ)
    p = torch.from_numpy(grid[point])
    official = reference_thresholds(calib_conf, p)
    as_float64 = reference_thresholds(calib_conf, p.double())
    assert official[exit_k] != as_float64[exit_k]
    curve = budgeted_curve(*make_split(n, seed=n), *make_split(n, seed=n + 1), COSTS, grid="official")
    assert curve.loc[point, f"threshold_{exit_k}"] == float(official[exit_k])
