"""One copy of the curve maths (dynexit.curves) and of exit scoring (dynexit.policies): the pipeline's
runs.csv, the analysis' ablation table and the threshold search read the same number off a curve, points
of equal cost included; the criteria are listed once; numpy and torch scores are equal."""
import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dynexit import analysis
from dynexit.config import RunConfig
from dynexit.curves import accuracy_at_budget, envelope_points, interpolate, mean_best_within_budget
from dynexit.policies import CRITERIA, GRIDS, exit_scores
from dynexit.runs.pipeline import summarize
from dynexit.search import compare_with_protocol

PACKAGE = Path(__file__).resolve().parents[1] / "dynexit"
# Out of cost order, with two points at cost 2 (60 and 70 %) and a last point below its neighbour.
CURVE = pd.DataFrame({"point": range(5), "test_expected_cost": [3.0, 2.0, 1.0, 2.0, 4.0],
                      "test_accuracy": [75.0, 70.0, 50.0, 60.0, 74.0]})
BUDGETS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.5, 4.0, 4.5]
# By hand, through (1, 50), (2, 70) (the better of the two at cost 2), (3, 75), (4, 74); NaN outside [1, 4].
EXPECTED = [math.nan, 50.0, 60.0, 70.0, 72.5, 74.5, 74.0, math.nan]


def test_equal_costs_keep_the_best_point():
    costs, accuracies = envelope_points(CURVE["test_expected_cost"], CURVE["test_accuracy"])
    assert costs.tolist() == [1.0, 2.0, 3.0, 4.0] and accuracies.tolist() == [50.0, 70.0, 75.0, 74.0]
    np.testing.assert_allclose(interpolate(CURVE["test_expected_cost"], CURVE["test_accuracy"], BUDGETS), EXPECTED)
    assert math.isnan(accuracy_at_budget([], [], 1.0))
    # The staircase reading (best within each budget) over [1, 4]: 50 on [1, 2), then 70, then 75.
    assert mean_best_within_budget(CURVE["test_expected_cost"], CURVE["test_accuracy"], 1.0, 4.0) == \
        pytest.approx((50 + 70 + 75) / 3)
    # Past the last point (74 % at 4) the best within budget is still the cheaper 75 % point.
    assert mean_best_within_budget(CURVE["test_expected_cost"], CURVE["test_accuracy"], 1.0, 5.0) == \
        pytest.approx((50 + 70 + 75 + 75) / 4)
    with pytest.raises(ValueError, match="below the cheapest"):
        mean_best_within_budget([1.0], [50.0], 0.5, 2.0)


def _pipeline(budgets):
    cfg = RunConfig()
    cfg.eval.budgets = list(budgets)
    exits = ["early", "last"]
    costs = pd.DataFrame({"exit": exits, "gmacs": [1.0, 4.0]})
    anytime = pd.DataFrame({"exit": exits, "cost": [1.0, 4.0], "accuracy": [50.0, 74.0]})
    row = summarize(cfg, 3, exits, costs, CURVE, anytime, train_seconds=1.0)
    return [row[f"acc_at_{b:g}"] for b in budgets]


def _analysis(tmp_path, budgets):
    run = {"run_id": "r0", "variant": "full", "seed": 0, "params": 3, "acc_early": 50.0, "gmacs_early": 1.0,
           "acc_last": 74.0, "gmacs_last": 4.0, "acc_final": 74.0, "gmacs_final": 4.0}
    pd.DataFrame([run]).to_csv(tmp_path / "runs.csv", index=False)
    CURVE.assign(run_id="r0").to_csv(tmp_path / "curves.csv", index=False)
    metrics = analysis.run_metrics(analysis.load_results(tmp_path), budgets)
    return [float(metrics[analysis.budget_column(b)].iloc[0]) for b in budgets]


def _search(budgets):
    protocol = pd.DataFrame({"point": range(len(budgets)), "test_expected_cost": budgets,
                             "test_accuracy": np.zeros(len(budgets))})
    return compare_with_protocol(CURVE, protocol)["searched_test_accuracy"].tolist()


def test_pipeline_analysis_and_search_read_the_same_numbers(tmp_path):
    pipeline, table, search = _pipeline(BUDGETS), _analysis(tmp_path, BUDGETS), _search(BUDGETS)
    np.testing.assert_array_equal(pipeline, table)
    np.testing.assert_array_equal(pipeline, search)
    np.testing.assert_allclose(pipeline, EXPECTED)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("temperature", [None, 0.7])
def test_exit_scores_are_equal_for_numpy_and_torch(criterion, temperature):
    rng = np.random.default_rng(CRITERIA.index(criterion))
    logits = (rng.normal(size=(300, 7)) * 4).astype(np.float32)
    logits[:3] = 0.0  # ties: the first index wins in both
    conf_np, pred_np = exit_scores(logits, criterion, temperature)
    conf_t, pred_t = exit_scores(torch.from_numpy(logits), criterion, temperature)
    assert isinstance(conf_np, np.ndarray) and isinstance(conf_t, torch.Tensor)
    assert conf_np.dtype == np.float32 and pred_np.dtype == np.int64
    assert np.array_equal(conf_np, conf_t.numpy()) and np.array_equal(pred_np, pred_t.numpy())
    assert pred_np[:3].tolist() == [0, 0, 0]
    # and they are the criteria: the max-softmax confidence and prediction from a float64 softmax
    z = logits.astype(np.float64) / (temperature or 1.0)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert np.array_equal(pred_np, logits.argmax(axis=1))
    if criterion == "max_softmax":
        np.testing.assert_allclose(conf_np, probs.max(axis=1), rtol=0, atol=2e-6)


def _string_tuples(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            values = {n.value for n in node.elts if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if values:
                yield values


@pytest.mark.parametrize("names, home", [(CRITERIA, "dynexit/policies/criteria.py"),
                                         (GRIDS, "dynexit/policies/grids.py")], ids=["criteria", "grids"])
def test_criteria_and_grids_are_listed_once(names, home):
    """Only their home module spells out the list; every other module (the CLI's choices included)
    imports it."""
    listed = [str(path.relative_to(PACKAGE.parent)) for path in sorted(PACKAGE.rglob("*.py"))
              if any(len(set(names) & values) >= 2 for values in _string_tuples(ast.parse(path.read_text())))]
    assert listed == [home]

