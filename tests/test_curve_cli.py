"""`dynexit curve` end to end on the reference fixture, and the logits files it reads."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from protocol_reference import assert_reproduces_reference, load_reference

from dynexit import create_model
from dynexit.cli import main
from dynexit.logits import collect_logits, load_logits, save_logits

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["early3", "att", "cnn", "merge"]


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.fixture
def logits_files(tmp_path, reference):
    arrays, _ = reference
    calib, test = tmp_path / "calib.npz", tmp_path / "test.npz"
    save_logits(calib, arrays["calib_logits"], arrays["calib_targets"])
    save_logits(test, arrays["test_logits"], arrays["test_targets"])
    return calib, test


def test_curve_cli_reproduces_reference(tmp_path, logits_files, reference, capsys):
    _, meta = reference
    calib, test = logits_files
    out = tmp_path / "curve.csv"
    costs = ",".join(str(c) for c in meta["costs"])
    assert main(["curve", "--calib", str(calib), "--test", str(test), "--costs", costs, "--grid", "official",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "33 points" in printed and str(out) in printed
    curve = pd.read_csv(out)
    expected = (["point"] + [f"target_share_{k}" for k in range(4)] + [f"threshold_{k}" for k in range(4)]
                + ["criterion"] + [f"temperature_{k}" for k in range(4)]
                + ["calib_accuracy", "calib_expected_cost", "test_accuracy", "test_expected_cost"]
                + [f"calib_share_{k}" for k in range(4)] + [f"test_share_{k}" for k in range(4)])
    assert list(curve.columns) == expected
    points = meta["operating_points"]
    # the CSV keeps full precision: every threshold reads back as an exact float32 (a rounded decimal would
    # not be one), and the curve is the fixture's
    thresholds = curve[[f"threshold_{k}" for k in range(4)]].to_numpy()
    np.testing.assert_array_equal(thresholds, thresholds.astype(np.float32).astype(np.float64))
    assert assert_reproduces_reference(curve, reference) <= 8  # points with a tie: 4 of 33 here
    np.testing.assert_allclose(curve[[f"target_share_{k}" for k in range(4)]], [p["proportions"] for p in points],
                               rtol=1e-6)
    # the printed table shows the first point's test accuracy and cost
    assert f"{points[0]['test_accuracy']:.2f}" in printed


def test_curve_cli_reads_costs_csv_and_exit_names(tmp_path, logits_files, reference):
    _, meta = reference
    calib, test = logits_files
    costs = tmp_path / "costs.csv"
    pd.DataFrame({"exit": NAMES, "gmacs": meta["costs"], "params": [1, 2, 3, 4]}).to_csv(costs, index=False)
    out = tmp_path / "curve.csv"
    assert main(["curve", "--calib", str(calib), "--test", str(test), "--costs", str(costs), "--grid", "msdnet",
                 "--criterion", "margin", "--temperature", "--out", str(out)]) == 0
    curve = pd.read_csv(out)
    assert len(curve) == 39
    assert [c for c in curve.columns if c.startswith("threshold_")] == [f"threshold_{n}" for n in NAMES]
    assert (curve.threshold_merge == -1e8).all()
    # more budget, more accuracy on average: the curve's cost spans the exits' costs
    assert meta["costs"][0] < curve.test_expected_cost.min() < curve.test_expected_cost.max() < meta["costs"][-1]
    np.testing.assert_allclose(curve[[f"test_share_{n}" for n in NAMES]].sum(axis=1), 1.0)


@pytest.mark.parametrize("case, message", [
    ("costs", "--costs has 3 values"),
    ("missing", "missing.npz"),
    ("field", "'targets'"),
    ("samples", "samples"),
    ("no_gmacs", "'gmacs'"),
    ("not_numbers", "comma-separated"),
])
def test_curve_cli_errors_are_one_line(tmp_path, logits_files, reference, capsys, case, message):
    arrays, meta = reference
    calib, test = logits_files
    costs = ",".join(str(c) for c in meta["costs"])
    if case == "costs":
        costs = "1,2,3"
    elif case == "missing":
        calib = tmp_path / "missing.npz"
    elif case == "field":
        calib = tmp_path / "nofield.npz"
        np.savez(calib, logits=arrays["calib_logits"])
    elif case == "samples":
        calib = tmp_path / "short.npz"
        np.savez(calib, logits=arrays["calib_logits"], targets=arrays["calib_targets"][:-1])
    elif case == "no_gmacs":
        costs = str(tmp_path / "costs.csv")
        pd.DataFrame({"exit": NAMES, "flops": meta["costs"]}).to_csv(costs, index=False)
    elif case == "not_numbers":
        costs = "1,2,x,4"
    out = tmp_path / "curve.csv"
    assert main(["curve", "--calib", str(calib), "--test", str(test), "--costs", costs, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not out.exists()


def test_logits_files_round_trip_and_errors(tmp_path):
    logits = np.random.default_rng(0).normal(size=(3, 5, 4))
    targets = np.array([0, 3, 1, 2, 2])
    path = tmp_path / "sub" / "l.npz"
    save_logits(path, logits, targets)
    assert sorted(p.name for p in path.parent.iterdir()) == ["l.npz"]  # no temporary file left behind
    got_logits, got_targets = load_logits(path)
    assert got_logits.dtype == np.float32 and got_targets.dtype == np.int64
    np.testing.assert_array_equal(got_logits, logits.astype(np.float32))
    np.testing.assert_array_equal(got_targets, targets)
    with pytest.raises(ValueError, match="samples"):
        save_logits(path, logits, targets[:4])
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        save_logits(path, logits, targets + 2)
    np.testing.assert_array_equal(load_logits(path)[1], targets)  # a failed save leaves the file intact
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_logits(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", logits=logits[0], targets=targets)
    with pytest.raises(ValueError, match=r"\(exits, samples, classes\)"):
        load_logits(tmp_path / "bad.npz")


def test_collect_logits_matches_model_outputs():
    torch.manual_seed(0)
    model = create_model("tiny_perceiver_t16", num_classes=10, input_size=32)
    images = torch.randn(6, 3, 32, 32)
    targets = torch.tensor([3, 1, 4, 1, 5, 9])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=4)
    model.train()
    logits, got_targets = collect_logits(model, loader)
    assert model.training  # mode restored
    assert logits.shape == (model.num_exits, 6, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(got_targets, targets.numpy())
    model.eval()
    with torch.no_grad():
        direct = torch.stack(model(images)).numpy()
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
