"""The run pipeline keeps calibration and test apart: a finished run's curve is the budgeted protocol with
thresholds from its ``logits_calib.npz`` and accuracy and cost from its ``logits_test.npz``, and nothing
about the test logits reaches the thresholds."""
import shutil
import textwrap

import numpy as np
import pandas as pd
import pytest

from dynexit.config import load_run_config
from dynexit.logits import load_logits, save_logits
from dynexit.policies import assign_exits, confidence, find_thresholds, official_grid
from dynexit.runs.pipeline import evaluate_run, run_pipeline

CONFIG = """
model: {name: tiny_perceiver_t16, input_size: 16}
data: {name: digits, image_size: 16, train_subset: 128, calib_size: 160, test_subset: 120}
train: {epochs: 1, batch_size: 32, lr: 2.0e-3, threads: 1, progress: false, tensorboard: false}
eval: {grid: official, criterion: max_softmax, batch_size: 64}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny run through the whole pipeline (train, logits, costs, curve), done once."""
    folder = tmp_path_factory.mktemp("split")
    (folder / "config.yaml").write_text(textwrap.dedent(CONFIG))
    cfg = load_run_config(folder / "config.yaml")
    run = folder / "run"
    run.mkdir()
    run_pipeline(cfg, run, ["cpu"])
    return cfg, run


def thresholds_of(curve: pd.DataFrame, names: list[str]) -> np.ndarray:
    return curve[[f"threshold_{n}" for n in names]].to_numpy(np.float32)


def test_the_curve_is_calibrated_on_calib_and_measured_on_test(finished):
    cfg, run = finished
    calib, calib_targets = load_logits(run / "logits_calib.npz")
    test, test_targets = load_logits(run / "logits_test.npz")
    assert calib.shape[1] == 160 and test.shape[1] == 120  # the configured splits
    costs = pd.read_csv(run / "costs.csv")
    names, gmacs = list(costs["exit"]), costs["gmacs"].to_numpy()
    curve = pd.read_csv(run / "curve.csv")
    grid = official_grid()
    assert len(curve) == len(grid)
    calib_conf, test_conf = confidence(calib), confidence(test)
    samples = np.arange(test.shape[1])
    for point, p in enumerate(grid):
        row = curve.iloc[point]
        thresholds = find_thresholds(calib_conf, p)  # from the calibration logits only
        assert np.array_equal(thresholds_of(curve, names)[point], thresholds), point
        stops = assign_exits(test_conf, thresholds)  # applied to the test logits
        correct = test.argmax(-1)[stops, samples] == test_targets
        assert row["test_accuracy"] == correct.sum() * 100.0 / len(samples), point
        shares = np.bincount(stops, minlength=len(names)) / len(samples)
        assert [row[f"test_share_{n}"] for n in names] == shares.tolist(), point
        assert row["test_expected_cost"] == pytest.approx(float(shares @ gmacs), rel=1e-6), point
    # each exit alone (anytime.csv, the summary's acc_<exit>) on the test logits too
    anytime = pd.read_csv(run / "anytime.csv")
    assert anytime["accuracy"].tolist() == ((test.argmax(-1) == test_targets).sum(1) * 100.0 / len(samples)).tolist()


def test_changing_the_test_logits_leaves_the_thresholds(finished, tmp_path):
    cfg, run = finished
    before = pd.read_csv(run / "curve.csv")
    names = list(pd.read_csv(run / "costs.csv")["exit"])
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    test, targets = load_logits(copy / "logits_test.npz")
    rng = np.random.default_rng(0)
    save_logits(copy / "logits_test.npz", rng.normal(size=test.shape) * 4, targets)
    evaluate_run(cfg, copy)
    after = pd.read_csv(copy / "curve.csv")
    assert np.array_equal(thresholds_of(after, names), thresholds_of(before, names))
    calib_columns = [c for c in before.columns if c.startswith("calib_")]
    pd.testing.assert_frame_equal(after[calib_columns], before[calib_columns])
    assert not after["test_accuracy"].equals(before["test_accuracy"])  # the test logits were read
    # and the calibration logits do move them
    calib, calib_targets = load_logits(copy / "logits_calib.npz")
    save_logits(copy / "logits_calib.npz", calib[:, ::-1] * 0.5 + rng.normal(size=calib.shape), calib_targets)
    evaluate_run(cfg, copy)
    assert not np.array_equal(thresholds_of(pd.read_csv(copy / "curve.csv"), names), thresholds_of(before, names))
