"""ExitPolicy: a curve row becomes the argument of early_exit and reproduces the row's test figures exactly."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import dynexit
from dynexit.cli import main as cli_main
from dynexit.inference import early_exit
from dynexit.policies import ALWAYS, ExitPolicy, budgeted_curve

NAME, SIZE = "tiny_perceiver_t16", 16
COSTS = (1.0, 2.0, 3.5, 5.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # float64: the logits of a compacted batch (or of one image) equal those of the full batch to ~1e-15,
    # so the decisions of early exit are those of the curve on full-batch logits
    return dynexit.create_model(NAME, input_size=SIZE, num_classes=10).double().eval()


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits (bundled, no download): 8x8 grey images upsampled to 16 px, 3 channels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images[:240] / 16.0 - 0.5).unsqueeze(1).expand(-1, 3, -1, -1)
    x = F.interpolate(x.contiguous(), size=SIZE, mode="bilinear", align_corners=False)
    y = torch.from_numpy(data.target[:240]).long()
    return (x[:120], y[:120]), (x[120:], y[120:])


@pytest.fixture(scope="module")
def logits(model, digits):
    with torch.no_grad():
        return [torch.stack(model(x)).numpy() for x, _ in digits]


def curve_of(model, digits, logits, criterion, temperatures):
    (_, calib_y), (_, test_y) = digits
    return budgeted_curve(logits[0], calib_y.numpy(), logits[1], test_y.numpy(), COSTS, grid="msdnet",
                          criterion=criterion, temperatures=temperatures, exit_names=model.exit_names)


@pytest.mark.parametrize("criterion,temperatures", [("max_softmax", None), ("entropy", "fit"), ("margin", None)])
def test_policy_from_curve_reproduces_the_rows_test_figures(model, digits, logits, criterion, temperatures,
                                                            tmp_path):
    curve = curve_of(model, digits, logits, criterion, temperatures)
    path = tmp_path / "curve.csv"
    curve.to_csv(path, index=False)
    costs = curve["calib_expected_cost"]
    checked = 0
    for budget in np.quantile(costs, [0.3, 0.6, 0.9]):
        policy = ExitPolicy.from_curve(path, budget=budget)
        assert ExitPolicy.from_curve(curve, budget=budget) == policy  # a frame and its CSV give the same policy
        within = curve[curve["calib_expected_cost"] <= budget]
        row = within.loc[within["calib_accuracy"].idxmax()]  # the first of the most accurate rows
        best = within[within["calib_accuracy"] == row["calib_accuracy"]]
        row = best.loc[best["calib_expected_cost"].idxmin()]
        assert policy.criterion == criterion
        assert policy.thresholds == tuple(row[f"threshold_{n}"] for n in model.exit_names)
        if temperatures is None:
            assert policy.temperatures is None
        else:
            assert policy.temperatures == tuple(curve.attrs["temperatures"])
        (_, _), (test_x, test_y) = digits
        batched = early_exit(model, test_x, policy)
        one_by_one = [early_exit(model, test_x[i:i + 1], policy) for i in range(len(test_x))]
        singles = (torch.cat([p for p, _ in one_by_one]), torch.cat([e for _, e in one_by_one]))
        for predictions, exits in (batched, singles):
            accuracy = (predictions == test_y).sum().item() * 100.0 / len(test_y)
            shares = torch.bincount(exits, minlength=4).numpy() / len(test_y)
            assert accuracy == row["test_accuracy"]
            np.testing.assert_array_equal(shares, [row[f"test_share_{n}"] for n in model.exit_names])
        checked += int((shares > 0).sum() >= 2)  # a point that really splits the images between exits
    assert checked >= 2
    # point=i takes the row of that point
    assert ExitPolicy.from_curve(path, point=3).thresholds == tuple(
        curve.loc[curve["point"] == 3, [f"threshold_{n}" for n in model.exit_names]].iloc[0])


def test_thresholds_form_and_policy_agree(model, digits, logits):
    curve = curve_of(model, digits, logits, "margin", None)
    policy = ExitPolicy.from_curve(curve, point=10)
    (_, _), (test_x, _) = digits
    a = early_exit(model, test_x, policy)
    b = early_exit(model, test_x, list(policy.thresholds), criterion="margin")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="carries its criterion"):
        early_exit(model, test_x, policy, criterion="margin")
    other = ExitPolicy(("a", "b", "c", "d"), "margin", policy.thresholds)
    with pytest.raises(ValueError, match="not the model's"):
        early_exit(model, test_x, other)


def test_json_round_trip_and_errors_name_file_and_field(tmp_path):
    policy = ExitPolicy(("e1", "e2", "last"), "entropy", (-0.25, 0.1 + 0.2, float(ALWAYS)), (1.5, 0.7, 1 / 3))
    path = tmp_path / "policy.json"
    policy.save(path)
    assert ExitPolicy.load(path) == policy
    assert not [p for p in tmp_path.iterdir() if p.name != "policy.json"]  # no temporary left behind
    data = json.loads(path.read_text())

    def refused(change, match, error=ValueError):
        bad = tmp_path / "bad.json"
        bad.write_text(change if isinstance(change, str) else json.dumps({**data, **change}))
        with pytest.raises(error, match=match) as info:
            ExitPolicy.load(bad)
        assert str(bad) in str(info.value)

    refused("{not json", "cannot read exit policy file")
    refused({"criterion": "max_sofmax"}, "criterion: unknown criterion 'max_sofmax'")
    refused({"thresholds": [0.1, 0.2]}, "thresholds: need one per exit")
    refused({"thresholds": [0.1, 0.2, 0.0]}, "thresholds: the last exit .* takes everyone left")
    refused({"thresholds": [0.1, "x", -1e8]}, "thresholds: need numbers", TypeError)
    refused({"temperatures": [1.0, -1.0, 2.0]}, "temperatures: must be finite and positive")
    refused({"exit_names": ["a", "a", "b"]}, "exit_names: need distinct")
    refused({"version": 7}, "field 'version'")
    refused({"threshold": [1]}, "unknown field.*'threshold'")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ExitPolicy.load(tmp_path / "missing.json")


def test_older_curves_load_as_max_softmax_without_temperature(tmp_path):
    committed = Path(__file__).resolve().parents[1] / "results" / "quickstart" / "curves.csv"
    curves = pd.read_csv(committed)  # an experiment's curves.csv, as earlier versions wrote it
    curves = curves.drop(columns=[c for c in curves.columns if c == "criterion" or c.startswith("temperature_")])
    path = str(tmp_path / "curves.csv")
    curves.to_csv(path, index=False)
    run = str(curves["run_id"].iloc[0])
    with pytest.raises(ValueError, match="choose one with run_id="):
        ExitPolicy.from_curve(path, budget=1.0)
    policy = ExitPolicy.from_curve(path, point=0, run_id=run)
    assert policy.criterion == "max_softmax" and policy.temperatures is None
    first = curves[curves["run_id"].astype(str) == run].iloc[0]
    assert policy.thresholds == tuple(first[f"threshold_{n}"] for n in policy.exit_names)
    with pytest.raises(ValueError, match="no operating point within budget"):
        ExitPolicy.from_curve(path, budget=1e-9, run_id=run)


def test_bench_times_a_policy(model, tmp_path, capsys):
    names = tuple(model.exit_names)
    path = tmp_path / "policy.json"
    ExitPolicy(names, "max_softmax", (0.105, 0.1, 0.1, float(ALWAYS))).save(path)
    args = ["bench", NAME, "--input-size", str(SIZE), "--num-classes", "10", "--repeats", "1", "--warmup", "0",
            "--images", "8", "--batch-size", "4"]
    assert cli_main([*args, "--policy", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"policy ({path})" in out and "criterion max_softmax" in out and "target shares" not in out
    curve = tmp_path / "curve.csv"
    pd.DataFrame([{"point": 0, **{f"threshold_{n}": t for n, t in zip(names, (0.2, 0.2, 0.2, -1e8))},
                   "calib_accuracy": 50.0, "calib_expected_cost": 1.0}]).to_csv(curve, index=False)
    assert cli_main([*args, "--curve", str(curve), "--budget", "2"]) == 0
    assert "budget 2" in capsys.readouterr().out
    assert cli_main([*args, "--curve", str(curve)]) == 1
    assert "exactly one of --budget and --point" in capsys.readouterr().err
    path.write_text(path.read_text().replace('"max_softmax"', '"max_sofmax"'))
    assert cli_main([*args, "--policy", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "criterion: unknown criterion 'max_sofmax'" in err
