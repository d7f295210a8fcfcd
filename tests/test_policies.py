"""Exit policies and the budgeted protocol: official-protocol equivalence on the reference fixture,
criteria on hand-computed examples, grids, label independence."""
from pathlib import Path

import numpy as np
import pytest
from protocol_reference import assert_reproduces_reference, load_reference

from dynexit.policies import (
    ALWAYS,
    NEVER,
    anytime_accuracy,
    assign_exits,
    budgeted_curve,
    confidence,
    evaluate_thresholds,
    find_thresholds,
    fit_temperatures,
    full_grid,
    msdnet_grid,
    official_grid,
    scores,
)

FIXTURES = Path(__file__).parent / "fixtures"
METRICS = ("calib_accuracy", "calib_expected_cost", "test_accuracy", "test_expected_cost")


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def _curve(reference, **kwargs):
    arrays, meta = reference
    return budgeted_curve(arrays["calib_logits"], arrays["calib_targets"], arrays["test_logits"],
                          arrays["test_targets"], meta["costs"], **kwargs)


@pytest.mark.parametrize("grid", ["official", "reference"])
def test_official_protocol_reproduces_reference(reference, grid):
    _, meta = reference
    points = meta["operating_points"]
    if grid == "reference":
        grid = np.array([p["proportions"] for p in points], dtype=np.float32)
    curve = _curve(reference, grid=grid)
    assert len(curve) == 33 and list(curve.point) == list(range(33))
    # ties explain a difference only at a few points (4 of 33 here), never at most of them
    assert assert_reproduces_reference(curve, reference) <= 8
    # shares: each split's exit shares sum to 1, and the calibration shares meet the targets from below
    for split in ("calib", "test"):
        np.testing.assert_allclose(curve[[f"{split}_share_{k}" for k in range(4)]].sum(axis=1), 1.0)
    n = len(reference[0]["calib_targets"])
    first = curve["calib_share_0"] * n
    assert (first >= np.floor(n * curve["target_share_0"].to_numpy(np.float32)) - 1e-9).all()


def test_official_grid_matches_reference(reference):
    _, meta = reference
    ref = np.array([p["proportions"] for p in meta["operating_points"]], dtype=np.float32)
    grid = official_grid()
    assert grid.shape == (33, 4) and grid.dtype == np.float32
    # the official code's own values differ between devices by a few ulps (CPU vs CUDA exp/log)
    np.testing.assert_array_max_ulp(grid, ref, maxulp=4)
    for n in (1000, 12_928, 50_000):
        np.testing.assert_array_equal(np.floor(np.float32(n) * grid), np.floor(np.float32(n) * ref))
    np.testing.assert_allclose(grid.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(grid[16], grid[17])  # q = 1 appears twice in the official list
    # q = 4, the last point: [0.012, 0.047, 0.188, 0.753] rescaled to [0.010, 0.047, 0.094, 0.849]
    np.testing.assert_allclose(grid[-1], [0.01, 0.0471429, 0.0942857, 0.8485714], atol=1e-6)


def test_official_grid_other_exit_counts():
    with pytest.raises(ValueError, match="4 exits"):
        official_grid(3)
    with pytest.raises(ValueError, match="scales"):
        official_grid(3, scales=(1.0,))
    plain = official_grid(3, scales=(1.0, 1.0))  # no rescaling: the geometric shares of the official q
    q = np.concatenate([np.arange(4, 21) / 20, 20 / np.arange(20, 4, -1)])
    expected = q[:, None] ** np.arange(1, 4)
    np.testing.assert_allclose(plain, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("num_exits", [2, 4, 5])
def test_msdnet_grid_is_geometric(num_exits):
    grid = msdnet_grid(num_exits)
    assert grid.shape == (39, num_exits)  # MSDNet's dynamic evaluation: p = 1/20 .. 39/20
    np.testing.assert_allclose(grid.sum(axis=1), 1.0, atol=1e-6)
    p = np.arange(1, 40) / 20
    np.testing.assert_allclose(grid[:, 1:] / grid[:, :-1], np.repeat(p[:, None], num_exits - 1, 1), rtol=1e-5)
    np.testing.assert_allclose(grid[19], np.full(num_exits, 1 / num_exits), rtol=1e-6)  # p = 1: uniform
    # each row in float32 as the reference computes it: exp(log(float32(p)) * [1..K]), normalised in float32
    k = np.arange(1, num_exits + 1, dtype=np.float32)
    for i, row in zip(range(1, 40), grid):
        ref = np.exp(np.log(np.float32(i / 20)) * k).astype(np.float32)
        np.testing.assert_array_max_ulp(row, ref / ref.sum(dtype=np.float32), maxulp=4)


def _nominal_costs(grid, costs):
    return grid.astype(np.float64) @ np.asarray(costs, dtype=np.float64)


@pytest.mark.parametrize("num_exits", [2, 3, 4, 7])
def test_full_grid_spans_first_exit_to_last_densely(num_exits):
    grid = full_grid(num_exits)
    assert grid.dtype == np.float32 and grid.shape[1] == num_exits and len(grid) >= 40
    np.testing.assert_allclose(grid.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(grid[0], np.eye(num_exits)[0])  # everyone at the first exit
    np.testing.assert_array_equal(grid[-1], np.eye(num_exits)[-1])  # everyone at the last
    rng = np.random.default_rng(num_exits)
    for costs in (np.arange(1, num_exits + 1.0), np.cumsum(rng.uniform(0.01, 1, num_exits)),
                  np.r_[1.0, 1.0 + np.arange(1, num_exits) * 1e-3], np.r_[np.arange(1, num_exits) * 1e-3, 1.0]):
        nominal = _nominal_costs(grid, costs)
        span = costs[-1] - costs[0]
        assert nominal[0] == pytest.approx(costs[0]) and nominal[-1] == pytest.approx(costs[-1])
        assert (np.diff(nominal) >= -1e-9 * span).all()  # cheapest first, dearest last
        assert np.diff(nominal).max() <= 0.05 * span  # no gap wider than 5 % of the cost range


@pytest.mark.parametrize("num_exits", [2, 3, 4, 7])
def test_full_grid_curve_reaches_every_exit_budget(num_exits):
    """On continuous confidences the curve's calibration costs run from the first exit's cost to the
    last's, with no gap wider than 5 % of that range; the test split's ends are exactly the exits' costs."""
    rng = np.random.default_rng(7)
    costs = np.cumsum(rng.uniform(0.1, 1.0, num_exits))
    calib = rng.normal(size=(num_exits, 2000, 5)).astype(np.float32)
    test = rng.normal(size=(num_exits, 500, 5)).astype(np.float32)
    curve = budgeted_curve(calib, rng.integers(0, 5, 2000), test, rng.integers(0, 5, 500), costs)
    span = costs[-1] - costs[0]
    assert curve.calib_expected_cost.iloc[0] == pytest.approx(costs[0], rel=1e-6)
    assert curve.calib_expected_cost.iloc[-1] == pytest.approx(costs[-1], rel=1e-6)
    assert curve.test_expected_cost.min() == pytest.approx(costs[0], rel=1e-6)
    assert curve.test_expected_cost.max() == pytest.approx(costs[-1], rel=1e-6)
    assert np.diff(np.sort(curve.calib_expected_cost)).max() <= 0.05 * span + 1e-6
    assert {f"test_share_{k}" for k in range(num_exits)} <= set(curve.columns)


def test_permuted_labels_leave_exits_unchanged(reference):
    arrays, meta = reference
    rng = np.random.default_rng(0)
    base = _curve(reference)
    permuted = budgeted_curve(arrays["calib_logits"], rng.permutation(arrays["calib_targets"]),
                              arrays["test_logits"], rng.permutation(arrays["test_targets"]), meta["costs"])
    same = [c for c in base.columns if c.startswith(("threshold_", "calib_share_", "test_share_"))]
    same += ["calib_expected_cost", "test_expected_cost"]
    assert len(same) == 14
    np.testing.assert_array_equal(base[same].to_numpy(), permuted[same].to_numpy())
    assert (base.test_accuracy != permuted.test_accuracy).all()  # the labels did change
    # the per-sample assignment, not only the counts
    conf = confidence(arrays["test_logits"])
    row = base.iloc[10]
    thresholds = row[[f"threshold_{k}" for k in range(4)]].to_numpy(float)
    np.testing.assert_array_equal(assign_exits(conf, thresholds),
                                  assign_exits(conf, permuted.iloc[10][[f"threshold_{k}" for k in range(4)]]
                                               .to_numpy(float)))


def test_criteria_on_hand_computed_example():
    probs = np.array([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
    logits = np.log(probs)[None].astype(np.float32)  # (1 exit, 2 samples, 3 classes)
    np.testing.assert_allclose(confidence(logits, "max_softmax")[0], [0.5, 0.7], rtol=1e-6)
    np.testing.assert_allclose(confidence(logits, "margin")[0], [0.2, 0.5], rtol=1e-5)
    neg_entropy = (probs * np.log(probs)).sum(axis=1)  # -1.0297, -0.8018 nats
    np.testing.assert_allclose(confidence(logits, "entropy")[0], neg_entropy, rtol=1e-5)
    # temperature 2 on exit 0 only: softmax(log p / 2) is proportional to sqrt(p)
    two = np.concatenate([logits, logits])
    conf, pred = scores(two, "max_softmax", temperature=[2.0, 1.0])
    root = np.sqrt(probs)
    np.testing.assert_allclose(conf[0], root.max(1) / root.sum(1), rtol=1e-6)
    np.testing.assert_allclose(conf[1], [0.5, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(pred, [[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="criterion"):
        confidence(logits, "variance")
    with pytest.raises(ValueError, match="temperature"):
        confidence(logits, temperature=[1.0, 2.0])


def test_thresholds_and_assignment_on_small_example():
    conf = np.array([[0.9, 0.8, 0.7, 0.6, 0.5],
                     [0.99, 0.1, 0.3, 0.6, 0.2],
                     [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    # n_0 = 2: the 2nd most confident of all; n_1 = 2: the 2nd among samples 2, 3, 4 -> 0.3
    t = find_thresholds(conf, [0.4, 0.4, 0.2])
    np.testing.assert_array_equal(t, np.float32([0.8, 0.3, ALWAYS]))
    np.testing.assert_array_equal(assign_exits(conf, t), [0, 0, 1, 1, 2])
    # n_0 = 0 -> nobody exits at 0; n_1 = 10 > 5 remaining -> nobody at 1
    t = find_thresholds(conf, [0.0, 2.0, 0.0])
    np.testing.assert_array_equal(t, np.float32([NEVER, NEVER, ALWAYS]))
    np.testing.assert_array_equal(assign_exits(conf, t), [2, 2, 2, 2, 2])
    # ties: every sample at the n-th confidence exits
    tied = np.array([[0.9, 0.7, 0.7, 0.7, 0.1], [0.0] * 5], dtype=np.float32)
    t = find_thresholds(tied, [0.4, 0.6])
    assert t[0] == np.float32(0.7)
    np.testing.assert_array_equal(assign_exits(tied, t), [0, 0, 0, 0, 1])
    # the last exit takes everyone left whatever its threshold
    np.testing.assert_array_equal(assign_exits(conf, [2.0, 2.0, np.inf]), [2] * 5)


def test_evaluate_thresholds_numbers():
    conf = np.array([[0.9, 0.2, 0.8, 0.1], [0.5, 0.9, 0.1, 0.2], [0.3, 0.3, 0.3, 0.3]], dtype=np.float32)
    correct = np.array([[1, 0, 0, 1], [0, 1, 1, 1], [0, 1, 1, 0]], dtype=bool)
    result = evaluate_thresholds(conf, correct, [0.75, 0.85, 0.0], costs=[1.0, 2.0, 4.0])
    # exits: 0, 1, 0, 2 -> correct: yes, yes, no, no
    assert result.accuracy == 50.0
    np.testing.assert_allclose(result.shares, [0.5, 0.25, 0.25])
    assert result.expected_cost == pytest.approx(0.5 * 1 + 0.25 * 2 + 0.25 * 4, abs=1e-6)
    np.testing.assert_allclose(result.exit_accuracy, [50.0, 100.0, 0.0])
    none_at_1 = evaluate_thresholds(conf, correct, [0.75, 2.0, 0.0], costs=[1.0, 2.0, 4.0])
    assert np.isnan(none_at_1.exit_accuracy[1])
    with pytest.raises(ValueError, match="costs"):
        evaluate_thresholds(conf, correct, [0.75, 0.85, 0.0], costs=[1.0, 2.0])


def test_fit_temperatures_recovers_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(2, 20_000, 5)).astype(np.float32)
    # labels drawn from softmax(z / 2): the NLL-optimal temperature is 2 (up to sampling noise)
    p = np.exp(z[0] / 2.0) / np.exp(z[0] / 2.0).sum(1, keepdims=True)
    y = np.minimum((rng.random((20_000, 1)) > np.cumsum(p, axis=1)).sum(1), 4)
    # exit 1 sees the same labels through logits scaled by 1/4: its optimum is 2 / 4 = 0.5
    logits = np.stack([z[0], z[0] / 4.0])
    temps = fit_temperatures(logits, y)
    np.testing.assert_allclose(temps, [2.0, 0.5], rtol=0.05)
    np.testing.assert_allclose(temps[1], temps[0] / 4, rtol=1e-4)

    def nll(t: float) -> float:
        s = logits[0].astype(np.float64) / t
        s -= s.max(1, keepdims=True)
        return float((np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y]).mean())

    assert nll(temps[0]) <= min(nll(temps[0] * 0.98), nll(temps[0] * 1.02))


def test_anytime_accuracy_and_bad_input(reference):
    arrays, meta = reference
    table = anytime_accuracy(arrays["test_logits"], arrays["test_targets"], meta["costs"],
                             exit_names=["early3", "att", "cnn", "merge"])
    assert list(table.exit) == ["early3", "att", "cnn", "merge"]
    np.testing.assert_allclose(table.cost, meta["costs"])
    direct = (arrays["test_logits"].argmax(-1) == arrays["test_targets"]).mean(1) * 100
    np.testing.assert_allclose(table.accuracy, direct)
    with pytest.raises(ValueError, match="costs has 3 values"):
        budgeted_curve(arrays["calib_logits"], arrays["calib_targets"], arrays["test_logits"],
                       arrays["test_targets"], meta["costs"][:3])
    with pytest.raises(ValueError, match="test_targets"):
        budgeted_curve(arrays["calib_logits"], arrays["calib_targets"], arrays["test_logits"],
                       arrays["test_targets"][:10], meta["costs"])
    with pytest.raises(ValueError, match="4 exits"):
        budgeted_curve(arrays["calib_logits"][:3], arrays["calib_targets"], arrays["test_logits"][:3],
                       arrays["test_targets"], meta["costs"][:3], grid="official")
    named = _curve(reference, exit_names=["early3", "att", "cnn", "merge"], grid="msdnet")
    assert len(named) == 39 and "threshold_merge" in named and (named.threshold_merge == ALWAYS).all()
