"""Optuna searches: thresholds against the official protocol on the reference fixture, seeding, several
worker processes and killed workers on one SQLite study, the command, and the loss-weight search (a
stub trainer for pruning, the real trainer on digits for the objective)."""
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml

from dynexit.cli import main as cli_main
from dynexit.config import TrainConfig
from dynexit.logits import save_logits
from dynexit.policies import NEVER, budgeted_curve
from dynexit.runs.spec import expand
from dynexit.search import (
    ThresholdSearch,
    budget_verdict,
    compare_at_budgets,
    compare_with_protocol,
    curve_of_thresholds,
    open_storage,
    open_study,
    protocol_budgets,
    protocol_curve,
    run_trials,
    search_budgets,
    search_pareto,
    sqlite_url,
    threshold_problem,
)
from dynexit.search.loss_weights import (
    BEST_FILE,
    TRIALS_FILE,
    LossWeightSpace,
    baseline_params,
    budgeted_area,
    search_loss_weights,
)

FIXTURES = Path(__file__).parent / "fixtures"
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def reference():
    arrays = np.load(FIXTURES / "protocol_seed1.npz")
    meta = json.loads((FIXTURES / "protocol_seed1.json").read_text())
    return {key: arrays[key] for key in arrays.files}, meta


@pytest.fixture(scope="module")
def problem(reference):
    a, meta = reference
    return threshold_problem(a["calib_logits"], a["calib_targets"], a["test_logits"], a["test_targets"], meta["costs"])


def _study_trials(url: str) -> dict[str, list]:
    backend = open_storage(url).backend  # under the file lock: never races a worker creating the tables
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=backend).get_trials(deepcopy=False)
            for s in optuna.get_all_study_summaries(backend)}


# ------------------------------------------------------------------------------------------ thresholds

def test_shares_map_to_calibration_quantiles_and_protocol_thresholds_round_trip(problem):
    conf = problem.calib_conf
    n = conf.shape[1]
    t = problem.thresholds([0.0, 1.0, 0.25])
    assert t[0] == NEVER and t[1] == conf[1].min() and t[-1] < -1e7
    assert (conf[2] >= t[2]).sum() == n // 4 and t[2] == np.sort(conf[2])[::-1][n // 4 - 1]
    # The protocol's thresholds are calibration confidences: shares_of gives them back exactly.
    protocol = protocol_curve(problem, "official")
    thresholds = [np.array([row[f"threshold_{k}"] for k in range(4)], np.float32) for _, row in protocol.iterrows()]
    again = [problem.thresholds(problem.shares_of(t)) for t in thresholds]
    np.testing.assert_array_equal(np.stack(again)[:, :-1], np.stack(thresholds)[:, :-1])
    # curve_of_thresholds writes budgeted_curve's columns, with the same figures
    curve = curve_of_thresholds(problem, thresholds)
    assert list(curve.columns) == list(protocol.columns)
    for key in ("calib_accuracy", "calib_expected_cost", "test_accuracy", "test_expected_cost"):
        np.testing.assert_array_equal(curve[key], protocol[key])
    np.testing.assert_allclose(curve[[f"target_share_{k}" for k in range(4)]].to_numpy(),
                               protocol[[f"calib_share_{k}" for k in range(4)]].to_numpy())


def test_searched_thresholds_beat_the_official_protocol_on_the_fixture(reference, problem):
    """At the test cost of every protocol point within the searched curve's range, the searched test
    accuracy is at most 0.2 points below the protocol's, and higher on average (Pareto front and
    budgets at the protocol's calibration costs, up to its most accurate point)."""
    a, meta = reference
    protocol = budgeted_curve(a["calib_logits"], a["calib_targets"], a["test_logits"], a["test_targets"],
                              meta["costs"], grid="official")
    pareto = search_pareto(problem, n_trials=2000, seed=0)
    peak = protocol["calib_expected_cost"][protocol["calib_accuracy"].idxmax()]
    budgets = [b for b in protocol_budgets(problem, "official") if b <= peak]
    assert len(budgets) == 12
    per_budget = search_budgets(problem, budgets, n_trials=150, seed=0)
    for result, points in ((pareto, 10), (per_budget, 9)):
        cmp = compare_with_protocol(result.curve, protocol)
        assert cmp.attrs["points_in_range"] >= points
        assert cmp.attrs["min_difference"] >= -0.2, cmp.dropna()
        assert cmp.attrs["mean_difference"] > 0.5 and cmp.attrs["area_difference"] > 0.5
        # protocol points costlier than the whole searched curve are also less accurate than its best point
        beyond = cmp["test_expected_cost"] > result.curve["test_expected_cost"].max()
        assert (cmp.loc[beyond, "protocol_test_accuracy"] < result.curve["test_accuracy"].max()).all()
    # Budgets: within budget on calibration, and at least the protocol's calibration accuracy there.
    curve = per_budget.curve
    assert len(curve) == 12 and (curve["calib_expected_cost"].to_numpy() <= np.array(budgets) + 1e-12).all()
    feasible = [protocol.loc[protocol["calib_expected_cost"] <= b, "calib_accuracy"].max() for b in budgets]
    assert (curve["calib_accuracy"].to_numpy() >= np.array(feasible)).all()
    # Pareto: strictly better calibration accuracy at every step up in calibration cost
    front = pareto.curve
    assert (np.diff(front["calib_expected_cost"]) > 0).all() and (np.diff(front["calib_accuracy"]) > 0).all()
    # The trials table: every trial, recomputed thresholds, and the curve point of the chosen ones
    trials = per_budget.trials
    assert len(trials) == 12 * 150 and (trials["state"] == "COMPLETE").all()
    chosen = trials.dropna(subset=["point"]).sort_values("point")
    assert list(chosen["point"]) == list(range(12)) and chosen["feasible"].all()
    np.testing.assert_array_equal(chosen["calib_accuracy"], curve["calib_accuracy"])


def test_same_seed_same_trials_in_memory_and_on_sqlite(problem, tmp_path):
    def params(result):
        return result.trials[["share_0", "share_1", "share_2"]].to_numpy()

    first = search_budgets(problem, [0.8], n_trials=40, seed=3)
    again = search_budgets(problem, [0.8], n_trials=40, seed=3, storage=sqlite_url(tmp_path / "s.db"))
    other = search_budgets(problem, [0.8], n_trials=40, seed=4)
    np.testing.assert_array_equal(params(first), params(again))
    assert not np.allclose(params(first), params(other))
    pareto = [search_pareto(problem, n_trials=120, seed=s, population_size=20) for s in (5, 5)]
    np.testing.assert_array_equal(params(pareto[0]), params(pareto[1]))


def _fork(target, *args):
    """A worker process forked from this one (no second import of torch): ``target(*args)``, exit code 0."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


def _budget_worker(problem, url: str, barrier, out: Path, seed: int) -> None:
    barrier.wait()  # start together
    out.write_text(str(search_budgets(problem, [0.8, 0.9], n_trials=40, storage=url, seed=seed).added))


def test_two_processes_share_one_sqlite_study_without_losing_or_duplicating_trials(problem, tmp_path):
    import multiprocessing

    url = sqlite_url(tmp_path / "search.db")
    barrier = multiprocessing.get_context("fork").Barrier(2)
    procs = [_fork(_budget_worker, problem, url, barrier, tmp_path / f"added{seed}", seed) for seed in (0, 1)]
    for proc in procs:
        proc.join(300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    added = [int((tmp_path / f"added{seed}").read_text()) for seed in (0, 1)]
    assert sum(added) == 2 * 40 and min(added) > 0  # both worked, nothing was added twice
    studies = _study_trials(url)
    assert len(studies) == 2
    for trials in studies.values():
        assert sorted(t.number for t in trials) == list(range(40))
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert len({tuple(t.params.values()) for t in trials}) == 40


def _wait_for(condition, proc, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline and proc.is_alive():
        time.sleep(0.05)


def _kill(proc) -> None:
    assert proc.is_alive(), f"the worker ended early (exit code {proc.exitcode})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def test_a_killed_threshold_search_resumes_with_the_same_call(problem, tmp_path):
    url = sqlite_url(tmp_path / "search.db")
    proc = _fork(search_pareto, problem, 3000, url)

    def started() -> bool:
        try:
            return any(len(v) >= 30 for v in _study_trials(url).values())
        except Exception:  # noqa: BLE001 - the tables may not exist yet
            return False

    _wait_for(started, proc)
    _kill(proc)
    assert search_pareto(problem, 120, url).added < 120  # the killed worker's trials count
    trials = next(iter(_study_trials(url).values()))
    assert sorted(t.number for t in trials) == list(range(120))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def _live_worker(url: str, n: int, delay: float, marks: Path) -> None:
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    study = open_study(storage, "live", ["minimize"], optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        x = trial.suggest_float("x", -1, 1)
        (marks / str(trial.number)).touch()  # the test kills the worker while trial 1 sleeps
        time.sleep(delay)
        return x * x

    (marks / "ran").write_text(str(run_trials(storage, study, objective, n)))


def _live_pair_worker(url: str, barrier, out: Path) -> None:
    storage = open_storage(url)
    study = open_study(storage, "pair", ["minimize"], optuna.samplers.TPESampler(seed=int(out.name[-1])))

    def objective(trial):
        time.sleep(0.05)
        return trial.suggest_float("x", -1, 1) ** 2

    barrier.wait()
    ran = run_trials(storage, study, objective, 16)
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    out.write_text(f"{ran} {finished}")


def test_two_processes_share_one_live_study(tmp_path):
    import multiprocessing

    url = sqlite_url(tmp_path / "live.db")
    barrier = multiprocessing.get_context("fork").Barrier(2)
    procs = [_fork(_live_pair_worker, url, barrier, tmp_path / f"out{i}") for i in (0, 1)]
    for proc in procs:
        proc.join(300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    outs = [[int(v) for v in (tmp_path / f"out{i}").read_text().split()] for i in (0, 1)]
    assert sum(ran for ran, _ in outs) == 16 and min(ran for ran, _ in outs) > 0
    assert all(finished == 16 for _, finished in outs)  # each worker returned with the study complete
    trials = _study_trials(url)["pair"]
    assert sorted(t.number for t in trials) == list(range(16))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_a_killed_worker_of_a_live_study_resumes_with_the_same_call(tmp_path):
    url = sqlite_url(tmp_path / "live.db")
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = _fork(_live_worker, url, 8, 0.5, marks)
    _wait_for((marks / "1").exists, proc)
    _kill(proc)  # in the middle of trial 1
    _live_worker(url, 8, 0.01, marks)
    trials = _study_trials(url)["live"]
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 8  # finished trials counted against n_trials
    assert sorted(t.number for t in trials) == list(range(9)) and (marks / "ran").read_text() == "7"
    # the interrupted trial is marked failed (its heartbeat stopped) and run again with its parameters
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [1]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].params == failed[0].params
    assert retry[0].state == optuna.trial.TrialState.COMPLETE


def test_threshold_command_writes_the_curve_format_and_resumes(reference, tmp_path, capsys):
    a, meta = reference
    save_logits(tmp_path / "calib.npz", a["calib_logits"], a["calib_targets"])
    save_logits(tmp_path / "test.npz", a["test_logits"], a["test_targets"])
    costs = ",".join(str(c) for c in meta["costs"])
    common = ["--calib", str(tmp_path / "calib.npz"), "--test", str(tmp_path / "test.npz"), "--costs", costs]
    assert cli_main(["curve", *common, "--grid", "official", "--out", str(tmp_path / "protocol.csv")]) == 0
    args = ["search", "thresholds", *common, "--budgets", "0.75,0.85", "--grid", "official",
            "--out", str(tmp_path / "curve.csv")]
    assert cli_main([*args, "--trials", "20"]) == 0
    printed = capsys.readouterr().out
    assert "against the official protocol (33 points" in printed and "nan" not in printed.lower()
    for budget in ("0.75", "0.85"):  # one line per budget: who won and by how much
        assert re.search(rf"budget {budget}: search \d+\.\d\d % .* vs protocol \d+\.\d\d % \(point \d+, "
                         r".*\): (beat the protocol by|lost to the protocol by|tied with the protocol:) [-+]\d",
                         printed), printed
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve.columns) == list(pd.read_csv(tmp_path / "protocol.csv").columns) and len(curve) == 2
    assert len(pd.read_csv(tmp_path / "curve.trials.csv")) == 40 and (tmp_path / "search.db").is_file()
    # The same command with more trials resumes: finished trials count against --trials.
    assert cli_main([*args, "--trials", "30"]) == 0
    trials = pd.read_csv(tmp_path / "curve.trials.csv")
    assert len(trials) == 60 and all(sorted(g) == list(range(30)) for _, g in trials.groupby("study")["number"])
    assert (trials.dropna(subset=["point"])["budget"].tolist() == [0.75, 0.85])
    # The figure's points: the searched curve and the official protocol's, on the test split.
    assert (tmp_path / "curve.figure.png").read_bytes()[:4] == b"\x89PNG"
    points = pd.read_csv(tmp_path / "curve.figure.csv")
    searched = points[points["series"] == "searched"]
    curve = pd.read_csv(tmp_path / "curve.csv").sort_values("test_expected_cost")
    np.testing.assert_allclose(searched[["cost", "accuracy"]], curve[["test_expected_cost", "test_accuracy"]])
    protocol = pd.read_csv(tmp_path / "protocol.csv").sort_values("test_expected_cost", kind="stable")
    np.testing.assert_allclose(points.loc[points["series"] == "protocol (official)", ["cost", "accuracy"]],
                               protocol[["test_expected_cost", "test_accuracy"]])
    # --pareto: every complete trial and the front, on the calibration split
    pareto = ["search", "thresholds", *common, "--pareto", "--trials", "40", "--population", "10",
              "--out", str(tmp_path / "front.csv")]
    assert cli_main(pareto) == 0
    points = pd.read_csv(tmp_path / "front.figure.csv")
    trials = pd.read_csv(tmp_path / "front.trials.csv")
    tried = points[points["series"] == "trials"]
    assert len(tried) == (trials["state"] == "COMPLETE").sum() == 40
    np.testing.assert_allclose(tried["accuracy"], trials.loc[trials["state"] == "COMPLETE", "calib_accuracy"])
    front = pd.read_csv(tmp_path / "front.csv").sort_values("calib_expected_cost", kind="stable")
    np.testing.assert_allclose(points.loc[points["series"] == "Pareto front", ["cost", "accuracy"]],
                               front[["calib_expected_cost", "calib_accuracy"]])
    # Errors: one line naming the culprit.
    assert cli_main(["search", "thresholds", *common, "--budgets", "cheap", "--out", str(tmp_path / "x.csv")]) == 1
    assert "--budgets 'cheap'" in capsys.readouterr().err
    assert cli_main(["search", "thresholds", *common[:4], "--costs", "1,2", "--pareto", "--out", "x.csv"]) == 1
    assert "--costs has 2 values" in capsys.readouterr().err


def test_storage_and_study_errors_name_the_culprit(tmp_path):
    with pytest.raises(ValueError, match="not a database URL"):
        open_storage("results/study.db")
    storage = open_storage(sqlite_url(tmp_path / "s.db"))
    open_study(storage, "s", ["maximize"], optuna.samplers.RandomSampler(), attrs={"fingerprint": "a"})
    with pytest.raises(ValueError, match="study s .* other fingerprint"):
        open_study(storage, "s", ["maximize"], optuna.samplers.RandomSampler(), attrs={"fingerprint": "b"})
    with pytest.raises(ValueError, match="optimises"):
        open_study(storage, "s", ["minimize"], optuna.samplers.RandomSampler())
    with pytest.raises(ValueError, match="positive integer"):
        run_trials(storage, optuna.load_study(study_name="s", storage=storage.backend), lambda t: 0.0, 0)


# ---------------------------------------------------------------------------------------- loss weights

def test_budgeted_area_is_the_mean_best_accuracy_within_budget():
    # 4 samples, 2 exits costing 1 and 3: exit 0 is right on the two samples it is confident about,
    # exit 1 on all. Envelope: 50 % from cost 1, 100 % from cost 2 (the confident half leaves early).
    targets = np.array([0, 1, 0, 1])
    logits = np.zeros((2, 4, 2), np.float32)
    logits[0, [0, 1], [0, 1]] = 4.0  # confident and right
    logits[0, [2, 3], [1, 0]] = 0.5  # unsure and wrong
    logits[1, np.arange(4), targets] = 2.0
    grid = np.array([[0.5, 0.5]], np.float32)
    assert budgeted_area(logits, targets, [1.0, 3.0], (1.0, 3.0), grid=grid) == pytest.approx(75.0)
    assert budgeted_area(logits, targets, [1.0, 3.0], (1.5, 3.0), grid=grid) == pytest.approx(250 / 3)
    assert budgeted_area(logits, targets, [1.0, 3.0], (2.0, 3.0), grid=grid) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="below the cost of the first exit"):
        budgeted_area(logits, targets, [1.0, 3.0], (0.5, 3.0), grid=grid)


SPEC = """
name: lw
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16, input_size: 16}}
  data: {{name: digits, image_size: 16, train_subset: 96, test_subset: 48, calib_size: 64}}
  train: {{epochs: {epochs}, batch_size: 32, lr: 0.002, progress: false, tensorboard: false, ema: false}}
variants:
  full: {{}}
"""


def test_loss_weight_search_prunes_poor_trials_and_writes_a_spec_fragment(tmp_path):
    """Stub trainer with the per-epoch callback and a stub score (a function of the sampled values)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "res", epochs=4))
    seen = []

    def trainer(cfg, run_dir, device=None, resume=True, on_epoch_end=None):
        seen.append((Path(run_dir).name, dict(cfg.train.loss_weights), cfg.train.distill_alpha,
                     cfg.train.distill_temperature))
        for epoch in range(1, cfg.train.epochs + 1):
            on_epoch_end(epoch=epoch, model=None, ema=None)

    def scorer(model, cfg, folder):  # best at early3 = 0.5, att = 1.5; the same at every epoch
        w = cfg.train.loss_weights
        return 80 - 10 * abs(np.log(w["early3"] / 0.5)) - 10 * abs(np.log(w["att"] / 1.5))

    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    result = search_loss_weights(spec, n_trials=10, seed=0, trainer=trainer, scorer=scorer, pruner=pruner)
    table = pd.read_csv(tmp_path / "res" / "search" / "loss_weights" / TRIALS_FILE)
    assert len(table) == 10 and set(table["state"]) == {"COMPLETE", "PRUNED"}
    pruned, complete = table[table["state"] == "PRUNED"], table[table["state"] == "COMPLETE"]
    assert len(pruned) >= 2 and (pruned["epochs_reported"] < 4).all() and (complete["epochs_reported"] == 4).all()
    assert pruned["last_reported"].max() < complete["objective"].max()
    # Trial 0 is the base configuration's own values (README weights, alpha 0.5, T 1); the rest are sampled.
    assert table["baseline"].tolist() == [True] + [False] * 9
    assert table.loc[0, ["weight_early3", "weight_att", "weight_cnn", "distill_alpha", "distill_temperature"]
                     ].tolist() == [0.5, 0.5, 1.0, 0.5, 1.0]
    # Every trial trained its own configuration: sampled weights, the last exit at 1, distillation.
    assert len({s[0] for s in seen}) == 10
    for (_, weights, alpha, temp), (_, row) in zip(seen, table.iterrows()):
        assert weights == pytest.approx({"early3": row["weight_early3"], "att": row["weight_att"],
                                         "cnn": row["weight_cnn"], "merge": 1.0})
        assert (alpha, temp) == pytest.approx((row["distill_alpha"], row["distill_temperature"]))
    # The best trial as a fragment the runner accepts.
    best = complete.loc[complete["objective"].idxmax()]
    assert result.best_number == best["number"]
    fragment = yaml.safe_load((tmp_path / "res" / "search" / "loss_weights" / BEST_FILE).read_text())
    raw = yaml.safe_load(spec.read_text())
    raw["variants"].update(fragment["variants"])
    run = next(r for r in expand(raw).runs if r.variant == "searched_loss_weights")
    assert run.config.train.loss_weights == pytest.approx(
        {"early3": best["weight_early3"], "att": best["weight_att"], "cnn": best["weight_cnn"], "merge": 1.0}, rel=1e-5)
    assert run.config.train.distill_alpha == pytest.approx(best["distill_alpha"], rel=1e-5)


def test_a_loss_weight_study_is_not_resumed_with_another_objective(tmp_path):
    """Run ids leave eval out, but the objective's curve follows eval.criterion and eval.grid."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "res", epochs=1))
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def trainer(cfg, run_dir, device=None, resume=True, on_epoch_end=None):
        on_epoch_end(epoch=1, model=None, ema=None)

    def scorer(model, cfg, folder):
        return 50.0

    search_loss_weights(spec, n_trials=1, storage=storage, trainer=trainer, scorer=scorer)
    with pytest.raises(ValueError, match="other objective_eval"):
        search_loss_weights(spec, n_trials=2, storage=storage, trainer=trainer, scorer=scorer,
                            overrides=["eval.criterion=entropy"])
    assert len(search_loss_weights(spec, n_trials=2, storage=storage, trainer=trainer, scorer=scorer).trials) == 2


def test_baseline_trial_keeps_the_base_ratios_and_needs_the_space_to_hold_them():
    names = ("early3", "att", "cnn", "merge")
    cfg = TrainConfig(loss_weights={"early3": 1.0, "att": 0.4, "cnn": 2.0, "merge": 2.0}, distill_alpha=1.0,
                      distill_temperature=2.0)
    assert baseline_params(cfg, names, LossWeightSpace()) == pytest.approx(
        {"weight_early3": 0.5, "weight_att": 0.2, "weight_cnn": 1.0, "distill_alpha": 0.5, "distill_temperature": 2.0})
    assert baseline_params(cfg, names, LossWeightSpace(weight=(0.3, 2.0))) is None  # att 0.2 is outside
    cfg.loss_weights["merge"] = 0.0  # no ratio to the last exit
    assert baseline_params(cfg, names, LossWeightSpace()) is None


def test_loss_weight_search_trains_on_digits_and_scores_the_calibration_curve(tmp_path):
    """Two real trials of two epochs (tiny preset, a small digits subset), in an SQLite study; the trainer's
    per-epoch callback reports each epoch's score."""
    from dynexit.config import RunConfig, merge
    from dynexit.data import build_datasets, build_loaders
    from dynexit.logits import collect_logits
    from dynexit.models.checkpoint import load_model

    torch.set_num_threads(1)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "res", epochs=2))
    storage = sqlite_url(tmp_path / "res" / "study.db")
    result = search_loss_weights(spec, n_trials=2, storage=storage, seed=0, device="cpu")
    table = result.trials
    assert list(table["state"]) == ["COMPLETE", "COMPLETE"] and table["run_id"].is_unique
    assert (table["epochs_reported"] == 2).all() and (table["objective"] == table["last_reported"]).all()
    costs = optuna.load_study(study_name=result.study_name, storage=storage).user_attrs["costs"]
    for _, row in table.iterrows():
        folder = result.study_dir / "runs" / row["run_id"]
        cfg = merge(RunConfig, yaml.safe_load((folder / "config.yaml").read_text()))
        assert cfg.train.loss_weights["early3"] == pytest.approx(row["weight_early3"])
        logits, targets = collect_logits(load_model(folder / "checkpoint.pt"),
                                         build_loaders(build_datasets(cfg.data, folder), 64)["calib"])
        assert len(targets) == 64
        expected = budgeted_area(logits, targets, costs, (costs[0], costs[-1]))
        assert row["objective"] == pytest.approx(expected, abs=1e-9)
    assert (result.study_dir / BEST_FILE).is_file()
    # Run again: the study is complete, nothing is trained again.
    stamps = sorted(p.stat().st_mtime_ns for p in result.study_dir.glob("runs/*/checkpoint.pt"))
    again = search_loss_weights(spec, n_trials=2, storage=storage, seed=0, device="cpu")
    assert again.trials["number"].tolist() == [0, 1] and again.best == result.best
    assert sorted(p.stat().st_mtime_ns for p in result.study_dir.glob("runs/*/checkpoint.pt")) == stamps


def test_loss_weight_figures_from_trials_csv(tmp_path, caplog):
    import logging

    from dynexit.cli.search import write_loss_weight_figures

    trials = pd.read_csv(Path(__file__).resolve().parents[1] / "results/quickstart/search/loss_weights/trials.csv")
    written = write_loss_weight_figures(trials, tmp_path)
    assert {p.name for p in written} == {"optimization_history.png", "optimization_history.csv",
                                         "param_importances.png", "param_importances.csv"}
    history = pd.read_csv(tmp_path / "optimization_history.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert history["number"].tolist() == done["number"].tolist()
    np.testing.assert_allclose(history["objective"], done["objective"])
    np.testing.assert_allclose(history["best_so_far"], done["objective"].cummax())
    importances = pd.read_csv(tmp_path / "param_importances.csv")
    params = [c for c in trials.columns if c.startswith("weight_")] + ["distill_alpha", "distill_temperature"]
    assert sorted(importances["parameter"]) == sorted(p for p in params if p != "weight_merge")  # merge stays 1
    assert importances["importance"].sum() == pytest.approx(1.0)
    again = write_loss_weight_figures(trials, tmp_path / "again")
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in again]  # byte-stable

    few = trials[trials["number"] < 3]  # three complete trials: no importances, a note
    with caplog.at_level(logging.INFO, logger="dynexit.analysis.search_figures"):
        written = write_loss_weight_figures(few, tmp_path / "few")
    assert {p.name for p in written} == {"optimization_history.png", "optimization_history.csv"}
    assert "fewer than 4: no parameter importances" in caplog.text


def test_an_extended_or_resumed_loss_weight_study_never_repeats_a_setting(tmp_path):
    """2 trials, then the study extended to 4 in a new call (a new process's sampler), then a second study
    of 4 trials at once: every trial has its own values and run folder, and the same study gives the same
    trials however it was run."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "res", epochs=1))
    folders = []

    def trainer(cfg, run_dir, device=None, resume=True, on_epoch_end=None):
        folders.append(Path(run_dir).name)
        on_epoch_end(epoch=1, model=None, ema=None)

    def scorer(model, cfg, folder):
        return 50.0 + cfg.train.distill_alpha

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search_loss_weights(spec, n_trials=2, storage=storage, trainer=trainer, scorer=scorer)
    extended = search_loss_weights(spec, n_trials=4, storage=storage, trainer=trainer, scorer=scorer).trials
    params = ["weight_early3", "weight_att", "weight_cnn", "distill_alpha", "distill_temperature"]
    assert len(extended) == 4 and not extended.duplicated(subset=params).any()
    assert len(set(folders)) == 4 and len(folders) == 4  # no trial trained into another's folder
    at_once = search_loss_weights(spec, n_trials=4, storage=f"sqlite:///{tmp_path / 'b.db'}", trainer=trainer,
                                  scorer=scorer, study_dir=tmp_path / "b").trials
    np.testing.assert_array_equal(at_once[params].to_numpy(), extended[params].to_numpy())


def test_compare_at_budgets_picks_the_protocol_point_within_each_budget():
    """Hand-made: the protocol's pick within a budget is its most accurate point on the calibration split among
    those whose calibration cost fits; the verdict line says who won and by how much, never NaN."""
    curve = pd.DataFrame({"point": [0, 1], "calib_expected_cost": [0.9, 1.9], "calib_accuracy": [65.0, 75.0],
                          "test_expected_cost": [0.9, 1.9], "test_accuracy": [62.5, 68.0]})
    trials = pd.DataFrame({"budget": [1.0, 1.0, 2.0, 0.1], "point": pd.array([0, None, 1, None], dtype="Int64")})
    protocol = pd.DataFrame({"point": [0, 1, 2, 3], "calib_expected_cost": [0.5, 1.5, 1.5, 2.5],
                             "calib_accuracy": [60.0, 70.0, 69.0, 80.0], "test_accuracy": [61.0, 69.0, 70.0, 79.0]})
    table = compare_at_budgets(ThresholdSearch(curve, trials, [], 0), protocol).set_index("budget")
    assert list(table.index) == [0.1, 1.0, 2.0]
    assert table.at[1.0, "protocol_point"] == 0 and table.at[1.0, "difference"] == pytest.approx(1.5)
    assert table.at[2.0, "protocol_point"] == 1 and table.at[2.0, "difference"] == pytest.approx(-1.0)
    assert table.loc[0.1, ["searched_test_accuracy", "protocol_test_accuracy", "difference"]].isna().all()
    lines = [budget_verdict(row) for row in table.reset_index().to_dict("records")]
    assert lines[0] == "no searched point within the budget (no trial met it)"
    assert lines[1].endswith("beat the protocol by +1.50 points") and "point 0" in lines[1]
    assert lines[2].endswith("lost to the protocol by -1.00 points")
    assert not any("nan" in line.lower() for line in lines)
    lone = compare_at_budgets(ThresholdSearch(curve, trials.iloc[:1], [], 0), protocol.iloc[1:])
    assert budget_verdict(lone.iloc[0]).startswith("search 62.50 %; the protocol has no point within the budget")
