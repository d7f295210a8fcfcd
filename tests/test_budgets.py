"""Accuracy at budgets with bootstrap intervals and verdicts (dynexit.analysis.budgets, report/budgets.csv):
coverage of the intervals on synthetic logits of known accuracy, level/better/worse verdicts, pairing, and the
report's budgets.csv against the ablation table."""
import numpy as np
import pandas as pd
import pytest
from test_analysis import write_synthetic_results

from dynexit import analysis
from dynexit.analysis.budgets import (
    BUDGET_COLUMNS,
    bootstrap_accuracy,
    curve_outcomes,
    image_counts,
    interval,
    verdicts,
)
from dynexit.cli import main
from dynexit.policies import budgeted_curve


def _known_accuracy_logits(rng, accuracy: float, exits: int, samples: int, classes: int = 5):
    """Logits whose every exit is right with probability ``accuracy``, independently of its confidence: every
    policy's accuracy then has expectation ``accuracy``, at every budget."""
    targets = rng.integers(0, classes, samples)
    right = rng.random((exits, samples)) < accuracy
    pred = np.where(right, targets, (targets + rng.integers(1, classes, (exits, samples))) % classes)
    logits = np.zeros((exits, samples, classes), dtype=np.float32)
    np.put_along_axis(logits, pred[..., None], rng.uniform(0.5, 4.0, (exits, samples, 1)).astype(np.float32), -1)
    return logits, targets


def test_image_counts_are_draws_with_replacement():
    counts = image_counts(np.random.default_rng(0), 2000, 7)
    assert counts.shape == (2000, 7) and (counts.sum(axis=1) == 7).all()
    np.testing.assert_allclose(counts.mean(axis=0), 1.0, atol=0.06)  # every image drawn once per resample on average
    np.testing.assert_allclose(counts.var(axis=0), 7 * (1 / 7) * (6 / 7), rtol=0.15)  # binomial(7, 1/7)


def test_intervals_cover_a_known_accuracy_about_95_percent_of_the_time():
    """200 independent test sets of a two-exit model whose accuracy is 80 % at every budget: the 95 % intervals
    at two budgets (one between operating points, read through the interpolation) contain 80 % about 95 % of
    the time."""
    rng = np.random.default_rng(1)
    costs, budgets, trials = [1.0, 2.0], [1.37, 1.81], 200
    outcomes = []
    for _ in range(trials):
        calib = _known_accuracy_logits(rng, 0.8, 2, 300)
        test = _known_accuracy_logits(rng, 0.8, 2, 400)
        curve = budgeted_curve(*calib, *test, costs)
        outcomes.append(curve_outcomes(curve, *test, budgets, ["0", "1"])[None])
    samples = bootstrap_accuracy(outcomes, test_sets=range(trials), resamples=400, seed=2)  # independent sets
    low, high = interval(samples)
    covered = (low <= 80.0) & (80.0 <= high)
    assert 0.90 <= covered.mean() <= 0.985, covered.mean()
    width = (high - low).mean()  # about 2 x 1.96 x sqrt(0.8 x 0.2 / 400) = 7.8 points
    assert 6.5 < width < 9.0


def test_point_outcomes_average_to_the_interpolated_accuracy():
    rng = np.random.default_rng(3)
    calib, test = _known_accuracy_logits(rng, 0.7, 3, 500), _known_accuracy_logits(rng, 0.7, 3, 300)
    curve = budgeted_curve(*calib, *test, [1.0, 2.0, 4.0])
    budgets = [0.5, 1.0, 1.7, 2.9, 4.0, 4.5]
    values = curve_outcomes(curve, *test, budgets, ["0", "1", "2"])
    expected = analysis.tables.interpolate(curve.test_expected_cost, curve.test_accuracy, budgets)
    np.testing.assert_allclose(values.mean(axis=1) * 100, expected, rtol=1e-5)  # NaN outside the curve
    assert np.isnan(values[[0, 5]]).all() and np.isfinite(values[1:5]).all()
    wrong = curve.assign(test_accuracy=curve.test_accuracy + 1.0)  # the logits no longer give the curve
    with pytest.raises(ValueError, match="run x: operating point .* the logits and the curve disagree"):
        curve_outcomes(wrong, *test, [1.7], ["0", "1", "2"], where="run x")


def test_verdicts_level_better_worse():
    rng = np.random.default_rng(4)
    n = 2000
    strong = (rng.random(n) < 0.9).astype(np.float32)
    weak = (rng.random(n) < 0.6).astype(np.float32)
    outcomes = [v[None, None] for v in (strong, strong.copy(), weak)]  # one seed, one budget each
    samples = bootstrap_accuracy(outcomes, resamples=500, seed=0)
    diff = samples - samples[:, :1]
    low, high = interval(diff)
    assert list(verdicts(low, high)[:, 0]) == ["level", "level", "worse"]
    assert low[1, 0] == high[1, 0] == 0.0  # the same outcomes: exactly no difference in every resample
    low, high = interval(samples[:, :1] - samples[:, 2:])
    assert verdicts(low, high)[0, 0] == "better" and low[0, 0] > 25
    assert list(verdicts([np.nan, -1.0, 0.0], [1.0, -0.5, 0.0])) == ["", "worse", "level"]


def test_differences_are_paired_over_images_and_seeds():
    """B is A with 30 of 5,000 wrong images turned right (+0.6 points): alone, their intervals overlap widely;
    paired (the same resampled images), the difference's interval excludes 0. Two seeds each, drawn alike."""
    rng = np.random.default_rng(5)
    a = (rng.random((2, 5000)) < 0.8).astype(np.float32)
    b = a.copy()
    for s in range(2):
        b[s, np.flatnonzero(a[s] == 0)[:30]] = 1.0
    samples = bootstrap_accuracy([a[:, None], b[:, None]], resamples=1000, seed=1)
    (low_a, low_b), (high_a, high_b) = (v[:, 0] for v in interval(samples))
    assert low_b < high_a  # the accuracies' intervals overlap
    low, high = interval(samples[:, 1] - samples[:, 0])
    assert 0.3 < low[0] <= 0.6 <= high[0] < 0.9 and verdicts(low, high)[0] == "better"
    # on independent image draws (different test sets) the same difference is not resolved
    samples = bootstrap_accuracy([a[:, None], b[:, None]], test_sets=[0, 1], resamples=1000, seed=1)
    low, _ = interval(samples[:, 1] - samples[:, 0])
    assert low[0] < 0


def test_bootstrap_rejects_bad_shapes():
    with pytest.raises(ValueError, match="no configurations"):
        bootstrap_accuracy([])
    with pytest.raises(ValueError, match=r"outcomes\[1\] must have shape"):
        bootstrap_accuracy([np.zeros((1, 2, 5)), np.zeros((1, 3, 5))])
    with pytest.raises(ValueError, match="share test set"):
        bootstrap_accuracy([np.zeros((1, 2, 5)), np.zeros((1, 2, 6))])


def test_report_writes_budgets_csv_matching_the_ablation_table(tmp_path):
    folder = write_synthetic_results(tmp_path / "r", seeds=(0, 1), samples=200)
    assert main(["report", str(folder), "--budgets", "0.003,0.0045,0.0058", "--formats", "png"]) == 0
    table = pd.read_csv(folder / "report" / "budgets.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns) == BUDGET_COLUMNS
    results = analysis.load_results(folder)
    assert list(dict.fromkeys(table["configuration"])) == results.configs
    ablation = analysis.ablation_table(results, [0.003, 0.0045, 0.0058]).set_index("config")
    for row in table.itertuples():
        expected = ablation.at[row.configuration, analysis.budget_column(row.budget_gmacs)]
        assert row.accuracy == pytest.approx(expected, abs=1e-6, nan_ok=True)
        if np.isfinite(row.accuracy):
            assert row.ci_low <= row.accuracy <= row.ci_high
            assert row.delta == pytest.approx(row.accuracy - ablation.at[results.reference,
                                                                         analysis.budget_column(row.budget_gmacs)],
                                              abs=1e-6)
            assert row.delta_ci_low <= row.delta_ci_high
            assert row.verdict == ("level" if row.delta_ci_low <= 0 <= row.delta_ci_high
                                   else "better" if row.delta_ci_low > 0 else "worse")
        else:
            assert row.verdict == "" or pd.isna(row.verdict)
    reference = table[(table["configuration"] == results.reference) & table["accuracy"].notna()]
    assert len(reference) >= 2 and (reference["verdict"] == "level").all() and (reference["delta"] == 0).all()
    markdown = (folder / "report" / "budgets.md").read_text()
    assert "▲" in markdown or "▼" in markdown or "=" in markdown
    assert "@ 0.0045 GMACs" in markdown and "95 % interval" in markdown
    assert r"\uparrow" in (folder / "report" / "budgets.tex").read_text() or "▲" not in markdown
    assert "Accuracy at budgets" in (folder / "report" / "report.html").read_text()


def test_report_without_logits_leaves_intervals_blank(tmp_path, caplog):
    folder = write_synthetic_results(tmp_path / "r", seeds=(0,), samples=60)
    (folder / "runs" / "no_dwc-0" / "logits_test.npz").unlink()
    results = analysis.load_results(folder)
    table = analysis.budgets.budget_table(results, [0.0045])
    assert "no test logits" in caplog.text
    assert table["accuracy"].notna().sum() == 4 and table["ci_low"].isna().all() and (table["verdict"] == "").all()
