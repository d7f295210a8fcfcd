"""dynexit.analysis and `dynexit report` on small synthetic results folders (the runner's layout):
interpolation, area under the curve, mean/std over seeds and differences to the full model against
hand-computed values; the figure, table and files on a realistic folder (and on results/quickstart
when it exists)."""
import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dynexit import analysis
from dynexit.cli import main
from dynexit.curves import accuracy_at_budget, area_under_curve, interpolate
from dynexit.logits import save_logits
from dynexit.policies import anytime_accuracy, budgeted_curve, scores

QUICKSTART = Path(__file__).resolve().parents[1] / "results" / "quickstart"
EXITS = ("early3", "att", "cnn", "merge")


# ------------------------------------------------------------------------------ synthetic folders

def write_folder(root: Path, runs: list[dict], curves: dict[str, pd.DataFrame], spec: dict,
                 grid_keys: tuple[str, ...] = ()) -> Path:
    """runs.csv, curves.csv, experiment.yaml and index.csv as the runner writes them. ``runs``: one dict
    per run with the identifying columns, then the summary."""
    root.mkdir(parents=True, exist_ok=True)
    ids = ["run_id", "variant", "model.name", "data.name", "seed", *grid_keys]
    frame = pd.DataFrame(runs)
    frame.to_csv(root / "runs.csv", index=False)
    parts = []
    for run in runs:
        curve = curves[run["run_id"]].copy()
        if "point" not in curve.columns:
            curve.insert(0, "point", range(len(curve)))
        for i, key in enumerate(ids):
            curve.insert(i, key, run[key])
        parts.append(curve)
    pd.concat(parts, ignore_index=True).to_csv(root / "curves.csv", index=False)
    (root / "experiment.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    pd.DataFrame([{"run_id": r["run_id"], "variant": r["variant"], "overrides": "{}"} for r in runs]).to_csv(
        root / "index.csv", index=False)
    return root


# Hand-made curves (cost, accuracy); values in test_hand_computed below are worked out from these.
HAND = {
    ("full", 0): ([1.0, 2.0, 3.0, 4.0], [60.0, 70.0, 75.0, 76.0]),
    ("full", 1): ([1.5, 2.5, 3.5, 4.5], [62.0, 72.0, 76.0, 78.0]),
    ("no_x2z", 0): ([1.0, 2.0, 3.0], [50.0, 60.0, 70.0]),
    ("no_x2z", 1): ([1.0, 2.0, 3.0], [54.0, 62.0, 70.0]),
    ("static", 0): ([2.2], [65.0]),
    ("static", 1): ([2.2], [67.0]),
}


def hand_folder(root: Path) -> Path:
    runs, curves = [], {}
    for (variant, seed), (x, y) in HAND.items():
        rid = f"{variant}{seed}"
        exits = ["cnn"] if variant == "static" else list(EXITS)
        row = {"run_id": rid, "variant": variant, "model.name": "tiny_perceiver_t16", "data.name": "digits",
               "seed": seed, "model.x2z": False if variant == "no_x2z" else None,
               "params": {"full": 1000, "no_x2z": 900, "static": 500}[variant], "train_seconds": 1.0,
               "num_exits": len(exits)}
        for k, name in enumerate(exits):  # evenly spread costs; accuracy 2 points less per exit before the last
            row[f"gmacs_{name}"] = x[0] + k * (x[-1] - x[0]) / max(1, len(exits) - 1)
            row[f"acc_{name}"] = y[-1] - 2 * (len(exits) - 1 - k)
        row["acc_final"], row["gmacs_final"] = y[-1], x[-1]
        curve = pd.DataFrame({"test_expected_cost": x, "test_accuracy": y, "calib_expected_cost": x,
                              "calib_accuracy": y})
        row.update(curve_min_gmacs=min(x), curve_max_gmacs=max(x), curve_best_accuracy=max(y))
        row["acc_at_2"] = accuracy_at_budget(x, y, 2.0)
        runs.append(row)
        curves[rid] = curve
    spec = {"name": "hand", "variants": {"full": {}, "no_x2z": {"model.x2z": False}, "static": {}}, "seeds": [0, 1]}
    return write_folder(root, runs, curves, spec, grid_keys=("model.x2z",))


def _logits(rng, targets, strengths, classes):
    """Per-exit logits whose accuracy and confidence grow with the exit's strength."""
    onehot = np.eye(classes, dtype=np.float32)[targets]
    return np.stack([rng.normal(size=onehot.shape).astype(np.float32) * 1.5 + s * onehot for s in strengths])


SYNTHETIC = {  # variant: (exit costs in GMACs, logit strengths per exit, params)
    "full": ((0.002, 0.004, 0.005, 0.006), (1.0, 2.0, 2.2, 2.8), 50_000),
    "no_x2z": ((0.0019, 0.0038, 0.0047, 0.0056), (0.8, 1.8, 2.0, 2.5), 48_000),
    "no_dwc": ((0.0018, 0.0037, 0.0046, 0.0055), (1.0, 1.6, 2.1, 2.4), 47_000),
    "static": ((0.0045,), (2.3,), 30_000),
}


def _synthetic_metrics(run: int, names, epochs: int = 3) -> pd.DataFrame:
    """metrics.csv of run number ``run``: train_acc_<exit> = 10 * epoch + run + k, train_loss_<exit> =
    1 / epoch + k, test_acc_<exit> = 50 + run + k evaluated at the last epoch only (blank before)."""
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "train_loss": float(len(names)) / epoch}
        for k, name in enumerate(names):
            row[f"train_loss_{name}"] = 1.0 / epoch + k
            row[f"train_acc_{name}"] = 10.0 * epoch + run + k
            row[f"test_acc_{name}"] = 50.0 + run + k if epoch == epochs else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def write_synthetic_results(root: Path, seeds=(0, 1), samples: int = 300, classes: int = 10,
                            exit_names: bool = False, budgets=(0.003, 0.0045, 0.0058),
                            criterion: str = "max_softmax", names_of: dict | None = None) -> Path:
    """A results folder like the quickstart's: the variants of SYNTHETIC over ``seeds``, run folders
    with logits, costs, curve, anytime, summary, config and status. ``exit_names``: curve columns named
    after the exits (else numbered, as a curve computed without names)."""
    runs, curves = [], {}
    for variant, (costs, strengths, params) in SYNTHETIC.items():
        names = (names_of or {}).get(variant) or (["cnn"] if len(costs) == 1 else list(EXITS))
        for seed in seeds:
            rng = np.random.default_rng([seed, len(runs)])
            rid = f"{variant}-{seed}"
            folder = root / "runs" / rid
            folder.mkdir(parents=True)
            split = {}
            for name in ("calib", "test"):
                targets = rng.integers(0, classes, samples)
                logits = _logits(rng, targets, strengths, classes)
                save_logits(folder / f"logits_{name}.npz", logits, targets)
                split[name] = (logits, targets)
            (cl, ct), (tl, tt) = split["calib"], split["test"]
            if len(names) > 1:
                curve = budgeted_curve(cl, ct, tl, tt, costs, grid="official", criterion=criterion,
                                       exit_names=names if exit_names else None)
            else:
                curve = pd.DataFrame([{"calib_accuracy": float((cl[0].argmax(-1) == ct).mean() * 100),
                                       "calib_expected_cost": costs[0], "test_accuracy":
                                       float((tl[0].argmax(-1) == tt).mean() * 100), "test_expected_cost": costs[0]}])
            anytime = anytime_accuracy(tl, tt, costs)
            summary = {"params": params, "train_seconds": 2.0, "num_exits": len(names)}
            for k, name in enumerate(names):
                summary[f"acc_{name}"] = float(anytime["accuracy"].iloc[k])
                summary[f"gmacs_{name}"] = float(costs[k])
            summary.update(acc_final=summary[f"acc_{names[-1]}"], gmacs_final=summary[f"gmacs_{names[-1]}"],
                           curve_min_gmacs=float(curve["test_expected_cost"].min()),
                           curve_max_gmacs=float(curve["test_expected_cost"].max()),
                           curve_best_accuracy=float(curve["test_accuracy"].max()))
            for b in budgets:
                summary[f"acc_at_{b:g}"] = accuracy_at_budget(curve["test_expected_cost"], curve["test_accuracy"], b)
            curve.to_csv(folder / "curve.csv", index=False)
            anytime.to_csv(folder / "anytime.csv", index=False)
            pd.DataFrame({"exit": names, "gmacs": costs, "params": params}).to_csv(folder / "costs.csv", index=False)
            (folder / "summary.json").write_text(json.dumps(summary))
            (folder / "config.yaml").write_text(yaml.safe_dump({"eval": {"criterion": criterion, "grid": "official"},
                                                                "data": {"calib_size": samples}, "seed": seed}))
            (folder / "status.json").write_text(json.dumps({"state": "done"}))
            _synthetic_metrics(len(runs), names).to_csv(folder / "metrics.csv", index=False)
            runs.append({"run_id": rid, "variant": variant, "model.name": "tiny_perceiver_t16",
                         "data.name": "digits", "seed": seed,
                         "model.static": True if variant == "static" else None, **summary})
            curves[rid] = curve
    spec = {"name": "synthetic", "base": {"eval": {"budgets": list(budgets)}},
            "variants": {v: {} for v in SYNTHETIC}, "seeds": list(seeds)}
    return write_folder(root, runs, curves, spec, grid_keys=("model.static",))


def write_architectures(folder: Path) -> None:
    """The model sections of a synthetic folder's runs (the tiny Dyn-Perceiver and its static backbone, whose
    exits the runs list), so that their architectures can be built (``dynexit bench RESULTS_DIR``)."""
    for run in (folder / "runs").iterdir():
        model = {"name": "tiny_perceiver_t16", "num_classes": 10, "input_size": 28}
        if run.name.startswith("static"):
            model["static"] = True
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": model,
                                                         "data": {"name": "digits", "image_size": 28}}))


# ----------------------------------------------------------------------------------- hand-computed

def test_interpolate_never_extrapolates_and_keeps_the_best_of_equal_costs():
    # Two points cost 2: the curve goes through the better one, (2, 30) (dynexit.curves' rule).
    out = interpolate([3.0, 1.0, 2.0, 2.0], [40.0, 10.0, 20.0, 30.0], [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    np.testing.assert_allclose(out, [np.nan, 10.0, 20.0, 30.0, 35.0, 40.0, np.nan])


def test_area_under_curve_is_mean_accuracy_over_range():
    x, y = [0.0, 1.0, 2.0], [0.0, 10.0, 10.0]
    # over [0.5, 2]: (0.5 * (5 + 10) / 2 + 1 * 10) / 1.5
    assert area_under_curve(x, y, 0.5, 2.0) == pytest.approx((3.75 + 10.0) / 1.5)
    assert area_under_curve(x, [70.0] * 3, 0.0, 2.0) == pytest.approx(70.0)
    assert math.isnan(area_under_curve(x, y, 0.5, 2.5))  # beyond the curve: never extrapolated
    assert math.isnan(area_under_curve(x, y, 1.0, 1.0))


def test_hand_computed_band_table_and_differences(tmp_path):
    results = analysis.load_results(hand_folder(tmp_path / "hand"))
    assert results.configs == ["full", "no_x2z", "static"]
    assert results.static_configs == ["static"] and results.reference == "full"
    assert results.exit_names == list(EXITS) and results.budgets == [2.0]

    # seeds of "full" cover [1.5, 4]; knots 1.5, 2, 2.5, 3, 3.5, 4; at 2.5: seed 0 72.5, seed 1 72
    band = analysis.curve_band(results).set_index(["config", "cost"])
    np.testing.assert_allclose(band.loc["full"].index, [1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    assert band.loc[("full", 2.5), "mean"] == pytest.approx(72.25)
    assert band.loc[("full", 2.5), "std"] == pytest.approx(np.std([72.5, 72.0], ddof=1))
    assert band.loc[("full", 1.5), "mean"] == pytest.approx((65.0 + 62.0) / 2)
    np.testing.assert_allclose(band.loc["no_x2z", "mean"], [52.0, 61.0, 70.0])
    assert "static" not in band.index.get_level_values(0)

    assert analysis.common_cost_range(results) == (1.5, 3.0)
    table = analysis.ablation_table(results, budgets=[1.2, 2.0, 2.2, 4.2]).set_index("config")
    assert list(table.index) == ["full", "no_x2z", "static"]
    # AUC over [1.5, 3]: full 106.25/1.5 and 103.5/1.5; no_x2z 93.75/1.5 and 96/1.5
    full_auc, nox_auc = np.array([106.25, 103.5]) / 1.5, np.array([93.75, 96.0]) / 1.5
    assert table.at["full", "auc"] == pytest.approx(full_auc.mean())
    assert table.at["full", "auc_std"] == pytest.approx(full_auc.std(ddof=1))
    assert table.at["no_x2z", "auc"] == pytest.approx(63.25)
    assert table.at["no_x2z", "auc_std"] == pytest.approx(nox_auc.std(ddof=1))
    assert math.isnan(table.at["static", "auc"])
    # paired by seed: (62.5 - 70.833, 64 - 69)
    assert table.at["no_x2z", "delta_auc"] == pytest.approx((nox_auc - full_auc).mean())
    assert table.at["no_x2z", "delta_auc_std"] == pytest.approx((nox_auc - full_auc).std(ddof=1))
    assert table.at["full", "delta_auc"] == 0.0
    # final accuracy: full 76, 78; no_x2z 70, 70; static 65, 67
    assert table.at["no_x2z", "delta_acc_final"] == pytest.approx(-7.0)
    assert table.at["no_x2z", "delta_acc_final_std"] == pytest.approx(np.std([-6.0, -8.0], ddof=1))
    assert table.at["static", "delta_acc_final"] == pytest.approx(-11.0)
    assert table.at["static", "delta_acc_final_std"] == pytest.approx(0.0)
    # budgets: 2.0 -> full 70 and 67 (between 1.5: 62 and 2.5: 72); 2.2 -> full 71 and 69, static 65 and 67
    assert table.at["full", "acc_at_2"] == pytest.approx(68.5)
    assert table.at["full", "acc_at_2_std"] == pytest.approx(np.std([70.0, 67.0], ddof=1))
    assert table.at["no_x2z", "acc_at_2"] == pytest.approx(61.0)
    assert table.at["full", "acc_at_2.2"] == pytest.approx((71.0 + 69.0) / 2)
    assert table.at["static", "acc_at_2.2"] == pytest.approx(66.0)
    assert math.isnan(table.at["static", "acc_at_2"])  # the static point is at 2.2 only
    assert math.isnan(table.at["full", "acc_at_1.2"])  # seed 1 starts at 1.5: not every seed covers it
    assert math.isnan(table.at["full", "acc_at_4.2"]) and math.isnan(table.at["no_x2z", "acc_at_4.2"])
    # per-exit columns: mean over seeds; the static model has no early exits
    assert table.at["full", "acc_early3"] == pytest.approx((70.0 + 72.0) / 2)
    assert table.at["full", "acc_merge"] == pytest.approx(77.0)
    assert table.at["static", "acc_cnn"] == pytest.approx(66.0)
    assert math.isnan(table.at["static", "acc_early3"]) and math.isnan(table.at["static", "gmacs_att"])
    assert table.at["no_x2z", "params"] == 900

    text = analysis.to_markdown(analysis.ablation_table(results))
    lines = text.splitlines()
    assert lines[0].startswith("| Configuration | Params |") and sum(row.startswith("| ") for row in lines) == 4
    assert "| no_x2z |" in text and "63.25 ± 1.06" in text and "-6.67 ± 2.36" in text
    latex = analysis.to_latex(analysis.ablation_table(results))
    assert r"no\_x2z" in latex and r"63.25 $\pm$ 1.06" in latex and latex.count(r"\\") >= 5


def test_default_budgets_spread_over_the_common_range(tmp_path):
    folder = hand_folder(tmp_path / "hand")
    results = analysis.load_results(folder)
    assert results.budgets == [2.0]  # the spec's budget, a runs.csv column: not a default of the report
    budgets = analysis.default_budgets(results)
    np.testing.assert_allclose(budgets, [1.65, 1.95, 2.25, 2.55, 2.85])  # middles of 5 parts of [1.5, 3]
    table = analysis.ablation_table(results)
    assert table.attrs["budgets"] == budgets
    assert table[[analysis.budget_column(b) for b in budgets]].iloc[:2].notna().all().all()
    narrow = analysis.load_results(folder)
    narrow.curves = narrow.curves.assign(test_expected_cost=1 + narrow.curves["test_expected_cost"] * 1e-4)
    budgets = analysis.default_budgets(narrow)  # a range of 1.5e-4: still five distinct budgets inside it
    low, high = analysis.common_cost_range(narrow)
    assert len(set(budgets)) == 5 and all(low <= b <= high for b in budgets)


def test_grid_key_splits_configurations_and_matches_its_reference(tmp_path):
    runs, curves = [], {}
    for variant, base in (("full", 70.0), ("no_z2x", 60.0)):
        for lr, shift in ((0.001, 0.0), (0.003, 5.0)):
            rid = f"{variant}-{lr}"
            x, y = [1.0, 2.0], [base + shift, base + shift + 10]
            runs.append({"run_id": rid, "variant": variant, "model.name": "m", "data.name": "d", "seed": 0,
                         "train.lr": lr, "params": 1, "num_exits": 2, "acc_a": y[0], "gmacs_a": 1.0,
                         "acc_b": y[1], "gmacs_b": 2.0, "acc_final": y[1], "gmacs_final": 2.0})
            curves[rid] = pd.DataFrame({"test_expected_cost": x, "test_accuracy": y})
    folder = write_folder(tmp_path / "grid", runs, curves, {"name": "grid"}, grid_keys=("train.lr",))
    results = analysis.load_results(folder)
    assert results.config_keys == ["train.lr"]
    assert results.configs == ["full (train.lr=0.001)", "full (train.lr=0.003)", "no_z2x (train.lr=0.001)",
                               "no_z2x (train.lr=0.003)"]
    table = analysis.ablation_table(results).set_index("config")
    # compared with the full model of the same learning rate: 10 points less at both
    np.testing.assert_allclose(table["delta_auc"], [0.0, 0.0, -10.0, -10.0])
    assert table.at["full (train.lr=0.003)", "auc"] == pytest.approx(80.0)
    assert list(table["train.lr"]) == [0.001, 0.003, 0.001, 0.003]


def test_bad_folders_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        analysis.load_results(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="runs.csv"):
        analysis.load_results(tmp_path / "empty")
    folder = hand_folder(tmp_path / "hand")
    pd.read_csv(folder / "runs.csv").drop(columns=["seed"]).to_csv(folder / "runs.csv", index=False)
    with pytest.raises(ValueError, match="'seed'"):
        analysis.load_results(folder)
    (folder / "runs.csv").write_text("")
    with pytest.raises(ValueError, match="no finished run"):
        analysis.load_results(folder)


# ----------------------------------------------------------------------------- on a results folder

def _folders():
    params = [pytest.param("synthetic", id="synthetic")]
    if (QUICKSTART / "runs.csv").is_file():
        params.append(pytest.param(str(QUICKSTART), id="quickstart"))
    return params


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_results(tmp_path_factory.mktemp("results") / "synthetic")


@pytest.mark.parametrize("which", _folders())
def test_figure_and_table_cover_every_configuration(which, synthetic):
    folder = synthetic if which == "synthetic" else Path(which)
    results = analysis.load_results(folder)
    runs = results.runs
    assert set(results.configs) == set(runs["config"])

    fig = analysis.plot_budgeted_curves(results)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(c in labels for c in results.configs)
    assert "GMACs" in ax.get_xlabel() and "%" in ax.get_ylabel()

    table = analysis.ablation_table(results).set_index("config")
    assert list(table.index) == results.configs and table.index[0] == results.reference
    low, high = table.attrs["auc_range"]
    for config in results.configs:
        mine = runs[runs["config"] == config]
        curves = results.curves[results.curves["config"] == config]
        covered = curves.groupby("run_id")["test_expected_cost"].agg(["min", "max"])
        for budget in table.attrs["budgets"]:
            value = table.at[config, analysis.budget_column(budget)]
            inside = covered["min"].max() <= budget <= covered["max"].min()
            assert np.isfinite(value) == inside, (config, budget)
            column = f"acc_at_{budget:g}"
            if column in runs:  # the runner's own interpolation agrees
                assert value == pytest.approx(mine[column].mean(skipna=False), nan_ok=True)
        for name in results.exit_names:
            has = f"acc_{name}" in mine and mine[f"acc_{name}"].notna().all()
            assert np.isfinite(table.at[config, f"acc_{name}"]) == has
            if has:
                assert table.at[config, f"acc_{name}"] == pytest.approx(mine[f"acc_{name}"].mean())
                assert table.at[config, f"gmacs_{name}"] == pytest.approx(mine[f"gmacs_{name}"].mean())
        assert table.at[config, "acc_final"] == pytest.approx(mine["acc_final"].mean())
        assert table.at[config, "params"] == pytest.approx(mine["params"].mean())
        static = config in results.static_configs
        assert np.isfinite(table.at[config, "auc"]) != static
        assert np.isfinite(table.at[config, "delta_acc_final"])
        if not static:
            assert covered["min"].max() <= low < high <= covered["max"].min()
            assert table.at[config, "delta_auc"] == pytest.approx(
                table.at[config, "auc"] - table.at[results.reference, "auc"])
        if len(mine) > 1:
            assert table.at[config, "acc_final_std"] == pytest.approx(mine["acc_final"].std(ddof=1))


@pytest.mark.parametrize("exit_names", [False, True], ids=["numbered", "named"])
def test_exit_behaviour_reproduces_curves(tmp_path, exit_names):
    results = analysis.load_results(write_synthetic_results(tmp_path / "r", seeds=(0,), exit_names=exit_names))
    behaviour = analysis.exit_accuracy(results)
    assert set(behaviour["config"]) == set(results.dynamic_configs)
    for (rid, point), rows in behaviour.groupby(["run_id", "point"]):
        curve = results.curve(rid).set_index("point").loc[point]
        assert rows["share"].sum() == pytest.approx(100.0)
        overall = (rows["share"] * rows["accuracy"].fillna(0)).sum() / 100
        assert overall == pytest.approx(curve["test_accuracy"])
        cost = (rows["share"].to_numpy() / 100 * results.runs.set_index("run_id").loc[
            rid, [f"gmacs_{e}" for e in EXITS]].to_numpy(dtype=float)).sum()
        assert cost == pytest.approx(curve["test_expected_cost"], rel=1e-5)
    shares = analysis.exit_shares(results)
    assert set(shares["config"]) == set(results.dynamic_configs) and shares["share"].notna().all()
    merged = shares.merge(behaviour, on=["run_id", "point", "exit"], suffixes=("", "_recomputed"))
    assert len(merged) == len(behaviour)
    np.testing.assert_allclose(merged["share"], merged["share_recomputed"])

    hist = analysis.confidence_histograms(results, bins=10)
    runs = results.runs.set_index("config")
    for (config, name), rows in hist.groupby(["config", "exit"]):
        assert rows["samples"].iloc[0] == 300 == rows[["correct", "wrong"]].to_numpy().sum()
        assert rows["correct"].sum() / 3 == pytest.approx(runs.at[config, f"acc_{name}"])
    assert len(hist) == 10 * (3 * 4 + 1)


def test_confidence_is_the_max_softmax_of_policies_scores():
    # The histograms score with dynexit.policies.scores (no copy of the scoring code of their own).
    logits = np.array([[[0.0, 0.0], [3.0, 1.0]], [[1.0, 2.0], [0.0, 0.0]]], dtype=np.float32)
    conf, pred = scores(logits, "max_softmax")
    np.testing.assert_allclose(conf, [[0.5, 1 / (1 + math.exp(-2))], [1 / (1 + math.exp(-1)), 0.5]], rtol=1e-6)
    np.testing.assert_array_equal(pred, [[0, 0], [1, 0]])


def test_report_command_writes_figures_and_tables(tmp_path, capsys):
    folder = write_synthetic_results(tmp_path / "r", seeds=(0,), samples=120)
    assert main(["report", str(folder), "--budgets", "0.004,0.0052"]) == 0
    printed = capsys.readouterr().out
    out = folder / "report"
    for name in ("budgeted_curves", "exit_shares", "exit_accuracy", "confidence"):
        for suffix in (".png", ".pdf"):
            path = out / f"{name}{suffix}"
            assert path.stat().st_size > 1000 and str(path) in printed
    table = pd.read_csv(out / "ablation.csv")
    assert list(table["config"]) == list(SYNTHETIC)
    assert {"acc_at_0.004", "acc_at_0.0052", "auc", "delta_auc"} <= set(table.columns)
    results = analysis.load_results(folder)
    expected = analysis.ablation_table(results, budgets=[0.004, 0.0052])
    np.testing.assert_allclose(table["auc"], expected["auc"])
    assert (out / "ablation.md").read_text() in printed
    assert (out / "ablation.tex").read_text().startswith(r"\begin{tabular}")
    with open(out / "budgeted_curves.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err


def test_published_points_only_for_released_presets(synthetic):
    assert set(analysis.PUBLISHED["model"]) == {"reg800m_perceiver_t128", "resnet50_0375_perceiver_t128",
                                                "mobilenetV3_0x75_perceiver_t128"}
    reg = analysis.PUBLISHED.query("model == 'reg800m_perceiver_t128' and kind == 'exit'")
    assert list(reg["accuracy"]) == [68.62, 78.32, 79.15, 79.86] and reg["source"].str.contains(r"\[T\]").all()
    results = analysis.load_results(synthetic)
    labels = [t.get_text() for t in analysis.plot_budgeted_curves(results, published=True)
              .axes[0].get_legend().get_texts()]
    assert not any("published" in label for label in labels)  # no released preset in this experiment
    results.runs["model.name"] = "reg800m_perceiver_t128"
    ax = analysis.plot_budgeted_curves(results).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [label for label in labels if "published" in label] == ["published: each exit (README)",
                                                                    "published: curve (paper Fig. 8b/c)"]
    assert labels[:len(results.configs)] == results.configs
    marked = [line for line in ax.get_lines() if line.get_marker() == "x"]
    np.testing.assert_allclose(marked[0].get_xydata(), [[0.459, 68.62], [1.065, 78.32], [1.228, 79.15],
                                                        [1.298, 79.86]])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_report_is_byte_stable_whatever_the_row_order(tmp_path):
    """The same results give the same bytes in every file (figures carry no creation date, SVG ids are
    fixed), also when runs.csv and curves.csv list their rows in another order."""
    folder = write_synthetic_results(tmp_path / "r", seeds=(0,), samples=60)
    formats = ("png", "pdf", "svg")
    analysis.write_report(folder, formats=formats)
    first = _files(folder / "report")
    assert len(first) == 5 * 3 + 12 + 1 and all(first.values())  # 5 figures in 3 formats, 12 tables, the page
    for name in ("runs.csv", "curves.csv"):
        rows = pd.read_csv(folder / name)
        rows.iloc[::-1].to_csv(folder / name, index=False)
    assert pd.read_csv(folder / "runs.csv")["run_id"].iloc[0] == "static-0"
    analysis.write_report(folder, formats=formats)
    again = _files(folder / "report")
    assert [name for name in first if first[name] != again[name]] == []
    assert list(again) == list(first)
    assert list(pd.read_csv(folder / "report" / "run_metrics.csv")["run_id"]) == [
        f"{variant}-0" for variant in SYNTHETIC]


def test_a_failing_report_changes_no_file(tmp_path, capsys):
    """A run folder tampered with after the first report: the report fails midway (its exit-behaviour
    figures need the logits) and every file of the old report stays as it was; nothing new appears."""
    folder = write_synthetic_results(tmp_path / "r", seeds=(0,), samples=60)
    assert main(["report", str(folder), "--budgets", "0.004,0.0052"]) == 0
    before = _files(folder / "report")
    around = sorted(p.name for p in folder.iterdir())
    logits = folder / "runs" / "no_x2z-0" / "logits_test.npz"
    data = np.load(logits)
    save_logits(logits, data["logits"][:3], data["targets"])  # three exits, runs.csv lists four
    capsys.readouterr()
    assert main(["report", str(folder), "--budgets", "0.004,0.005"]) == 1  # other budgets: other tables
    assert "logits_test.npz has 3 exits" in capsys.readouterr().err
    assert _files(folder / "report") == before
    assert sorted(p.name for p in folder.iterdir()) == around
    # Without an old report, a failing one leaves no report folder.
    with pytest.raises(ValueError, match="3 exits"):
        analysis.write_report(folder, tmp_path / "elsewhere" / "report")
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_training_curves_are_seed_means_of_metrics_files(tmp_path):
    from dynexit.analysis.training_curves import plot_training_curves, training_bands, training_history

    folder = write_synthetic_results(tmp_path / "r", seeds=(0, 1))
    results = analysis.load_results(folder)
    bands = training_bands(training_history(results), results).set_index(
        ["config", "exit", "metric", "epoch"]).sort_index()
    numbers = {rid: i for i, rid in enumerate(f"{v}-{s}" for v in SYNTHETIC for s in (0, 1))}  # written in order
    for config in results.configs:
        rids = list(results.runs.loc[results.runs["config"] == config, "run_id"])
        for k, name in enumerate(results.run_exits(rids[0])):
            runs = [numbers[r] for r in rids]
            for epoch in (1, 2, 3):
                row = bands.loc[(config, name, "train_accuracy", epoch)]
                assert row["mean"] == pytest.approx(10 * epoch + np.mean(runs) + k)
                assert (row["min"], row["max"]) == (10 * epoch + min(runs) + k, 10 * epoch + max(runs) + k)
                assert bands.loc[(config, name, "train_loss", epoch), "mean"] == pytest.approx(1 / epoch + k)
            # evaluated at the last epoch only: one point
            assert bands.loc[(config, name, "accuracy")].index.tolist() == [3]
            assert bands.loc[(config, name, "accuracy", 3), "mean"] == pytest.approx(50 + np.mean(runs) + k)
            assert bands.loc[(config, name, "accuracy", 3), "seeds"] == 2
    fig = plot_training_curves(results)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3 * len(results.exit_names)

    out = write_report_files(folder)
    plotted = pd.read_csv(out / "training_curves.csv")
    full = plotted[(plotted["config"] == "full") & (plotted["exit"] == "merge") & (plotted["metric"] == "train_loss")]
    np.testing.assert_allclose(full["mean"], [1 + 3, 1 / 2 + 3, 1 / 3 + 3])
    assert (out / "training_curves.png").is_file()

    for rid in results.runs["run_id"]:  # without metrics files: no figure, no error
        (results.run_folder(rid) / "metrics.csv").unlink()
    assert "training curves" not in analysis.write_report(folder, tmp_path / "bare", formats=("png",))


def write_report_files(folder: Path) -> Path:
    analysis.write_report(folder, folder / "report", formats=("png",))
    return folder / "report"


class _PageParser(HTMLParser):
    """Checks nesting (every opened element closed in order, void elements aside) and collects what a
    self-contained page must not reference."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.refs, self.tags, self.cells = [], [], [], [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href", "srcset", "data", "action", "poster"):
                self.refs.append((tag, key, value or ""))
        if tag not in self.VOID:
            self.stack.append(tag)
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def test_report_page_is_self_contained_and_holds_the_table(tmp_path):
    folder = write_synthetic_results(tmp_path / "r", seeds=(0, 1), samples=80)
    written = analysis.write_report(folder, formats=("pdf",))  # the page embeds PNGs whatever the formats
    page = folder / "report" / "report.html"
    assert written["page"] == [page]
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    images = [v for tag, key, v in parser.refs if tag == "img"]
    assert len(images) == 5 and all(v.startswith("data:image/png;base64,") for v in images)
    for value in images:  # each a real PNG
        assert base64.b64decode(value.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(v.startswith(("data:", "#")) for _, _, v in parser.refs), parser.refs
    assert "script" not in parser.tags and "link" not in parser.tags
    assert re.search(r"https?://", text) is None

    # the ablation table's numbers, as the Markdown table shows them, and every run
    table = analysis.format_ablation(analysis.ablation_table(analysis.load_results(folder)))
    for value in table.to_numpy().ravel():
        if value:
            assert str(value).replace(" ± ", "\u2009±\u2009") in parser.cells, value
    runs = pd.read_csv(folder / "runs.csv")
    for rid, acc in zip(runs["run_id"], runs["acc_final"]):
        assert rid in parser.cells and f"{acc:.2f}" in parser.cells
    assert yaml.safe_dump({"name": "synthetic"}).strip() in text  # the spec
    assert "torch" in parser.cells and "matplotlib" in parser.cells
    analysis.write_report(folder, formats=("pdf",))
    assert page.read_text(encoding="utf-8") == text  # byte-stable


def _family_folder(root: Path, families: dict[str, tuple[list[str], list[float], list[float]]],
                   spec_extra: dict | None = None) -> Path:
    """One run per variant (seed 0): variant -> (exit names, cumulative GMACs, accuracy of each exit alone);
    the curve runs straight from the first exit to the last."""
    runs, curves = [], {}
    for variant, (names, gmacs, accs) in families.items():
        row = {"run_id": variant, "variant": variant, "model.name": variant, "data.name": "d", "seed": 0,
               "params": 100, "num_exits": len(names)}
        for name, g, a in zip(names, gmacs, accs):
            row[f"acc_{name}"], row[f"gmacs_{name}"] = a, g
        row["acc_final"], row["gmacs_final"] = accs[-1], gmacs[-1]
        runs.append(row)
        curves[variant] = pd.DataFrame({"test_expected_cost": [gmacs[0], gmacs[-1]],
                                        "test_accuracy": [accs[0], accs[-1]]})
    spec = {"name": "families", "variants": {v: {} for v in families}, **(spec_extra or {})}
    return write_folder(root, runs, curves, spec)


def test_mixed_families_table_lines_exits_up_by_position(tmp_path):
    folder = _family_folder(tmp_path / "mixed", {
        "static": (["cnn"], [2.0], [80.0]),
        "branchy": (["stage1", "stage2", "stage3"], [0.5, 1.0, 2.0], [60.0, 70.0, 78.0]),
        "msdnet": (["exit1", "exit2", "exit3", "exit4"], [0.4, 0.8, 1.2, 1.6], [65.0, 72.0, 76.0, 79.0])})
    results = analysis.load_results(folder)
    assert results.reference == "branchy"  # the first variant with a curve (static has none)
    table = analysis.ablation_table(results, budgets=[1.0]).set_index("config")
    assert table.attrs["by_position"] and table.attrs["exits"] == [f"position_{k}" for k in range(1, 5)]
    np.testing.assert_allclose(table.loc["branchy", ["acc_position_1", "acc_position_2", "acc_position_3"]],
                               [60.0, 70.0, 78.0])
    assert np.isnan(table.at["branchy", "acc_position_4"])
    np.testing.assert_allclose(table.loc["msdnet", [f"share_position_{k}" for k in range(1, 5)]],
                               [25.0, 50.0, 75.0, 100.0])
    assert table.loc["static", [f"acc_position_{k}" for k in range(1, 5)]].isna().all()  # no exits to line up
    assert table.at["static", "acc_final"] == 80.0
    np.testing.assert_allclose(table["delta_acc_final"], [0.0, 2.0, 1.0])  # every row against branchy
    assert not any(c.startswith(("acc_stage", "acc_exit1", "acc_cnn")) for c in table.columns)
    shown = analysis.format_ablation(table.reset_index())
    assert list(shown.columns[2:6]) == ["Exit 1 acc. (%)", "Exit 1 cost (%)", "Exit 2 acc. (%)", "Exit 2 cost (%)"]
    assert list(shown["Exit 2 cost (%)"]) == ["50", "", "50"]
    assert "Exit columns by position" in analysis.to_markdown(table.reset_index())
    # a spec's reference: names the reference; a name that is no variant is an error naming the file
    spec = yaml.safe_load((folder / "experiment.yaml").read_text())
    (folder / "experiment.yaml").write_text(yaml.safe_dump({**spec, "reference": "msdnet"}))
    assert analysis.load_results(folder).reference == "msdnet"
    (folder / "experiment.yaml").write_text(yaml.safe_dump({**spec, "reference": "resnet"}))
    with pytest.raises(ValueError, match=r"experiment.yaml: reference: 'resnet' is not a variant"):
        analysis.load_results(folder)


def test_one_family_keeps_its_exit_names(tmp_path):
    folder = _family_folder(tmp_path / "one", {
        "full": (["early3", "att", "cnn", "merge"], [1.0, 2.0, 3.0, 4.0], [60.0, 70.0, 72.0, 75.0]),
        "no_x2z": (["early3", "att", "cnn", "merge"], [0.9, 1.8, 2.7, 3.6], [58.0, 69.0, 71.0, 74.0]),
        "resnet": (["logits"], [2.5], [73.0])})
    table = analysis.ablation_table(analysis.load_results(folder))
    assert not table.attrs["by_position"] and table.attrs["exits"] == ["early3", "att", "cnn", "merge"]
    assert "acc_logits" not in table.columns and "share_early3" not in table.columns
    assert table.set_index("config").at["resnet", "acc_final"] == 73.0


def test_report_states_its_evaluation(tmp_path):
    """A folder evaluated with the entropy criterion: the report's header, table notes and curve captions say so
    (with the grid, the calibration size and the temperature), never "max softmax" for the curves."""
    folder = write_synthetic_results(tmp_path / "r", seeds=(0,), samples=60, criterion="entropy")
    analysis.write_report(folder, formats=("png",), budgets=[0.004])
    statement = ("Evaluation of the budgeted curves: criterion entropy; grid official; calibration 60 images; "
                 "temperature none.")
    for name in ("ablation.md", "budgets.md"):
        assert statement in (folder / "report" / name).read_text(), name
    page = (folder / "report" / "report.html").read_text()
    assert page.count(statement) >= 1 + 3 + 2  # header, three curve captions, the two tables' notes
    assert "max_softmax" not in page.split('id="spec"')[0]


MIXED = {"no_x2z": ["exit1", "exit2", "exit3", "exit4"], "no_dwc": ["stage1", "stage2", "stage3", "stage4"]}


def test_mixed_family_figures_are_readable(tmp_path):
    """Three families and a static model: every exit of every family in the exit legends, panels wrapped at
    four per row so that no report figure is wider than 2,600 px, the table by position."""
    from PIL import Image

    from dynexit.analysis.figures import wrapped_panels

    folder = write_synthetic_results(tmp_path / "r", seeds=(0,), samples=60, names_of=MIXED)
    written = analysis.write_report(folder, formats=("png",))
    widths = {p.name: Image.open(p).size[0] for paths in written.values() for p in paths if p.suffix == ".png"}
    assert {"budgeted_curves.png", "exit_shares.png", "confidence.png", "training_curves.png"} <= set(widths)
    assert max(widths.values()) <= 2600, widths
    results = analysis.load_results(folder)
    every_exit = {*EXITS, *MIXED["no_x2z"], *MIXED["no_dwc"]}
    for fig in (analysis.plot_exit_shares(results), analysis.plot_exit_accuracy(results)):
        assert every_exit <= {t.get_text() for t in fig.legends[0].get_texts()}
    fig = analysis.plot_confidence_histograms(results)
    lefts = {round(ax.get_position().x0, 3) for ax in fig.axes}
    assert len(lefts) == 4 and len(fig.axes) == 3 * 4 + 1
    columns = set(pd.read_csv(folder / "report" / "ablation.csv").columns)
    assert {f"acc_position_{k}" for k in range(1, 5)} <= columns and not columns & {"acc_stage1", "acc_exit1"}
    fig, axes, rows = wrapped_panels([list(range(7)), ["a"]], 2.0, 2.0)
    assert [len(r) for r in rows] == [7, 1]
    cells = [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in axes.values()]
    assert cells == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0)]  # 7 exits: rows of 4 and 3


def test_budgeted_curve_y_range_follows_the_curves():
    """An exit far below every curve is drawn on the bottom edge with its value, not stretching the range."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = hand_folder(Path(tmp) / "hand")
        runs = pd.read_csv(folder / "runs.csv")
        runs.loc[runs["variant"] == "full", "acc_early3"] = 20.0  # an exit alone at 20 %: far below the curves
        runs.to_csv(folder / "runs.csv", index=False)
        results = analysis.load_results(folder)
        ax = analysis.plot_budgeted_curves(results).axes[0]
        low, high = ax.get_ylim()
        assert 45 < low < 50 and 78 < high < 82  # curves span 50-78 (no_x2z starts at 50)
        marks = [t.get_text() for t in ax.texts]
        assert marks == ["20.0"]
