"""Progress of a running grid: ``dynexit status`` reads a run's epoch, last accuracy and time left from its
folder's files while another process holds its lock; the runner's worker processes draw no progress bar."""
import queue
import textwrap

import pandas as pd
import pytest

from dynexit.cli import main
from dynexit.config import save_yaml
from dynexit.runs.folders import RUNNING, experiment_status, run_dir, run_lock, write_status
from dynexit.runs.run_progress import run_progress
from dynexit.runs.runner import _worker
from dynexit.runs.spec import load_spec
from dynexit.training.metrics import METRICS_FILE
from dynexit.training.progress_bar import NO_BAR_ENV, show_progress_bar

SPEC = """
name: midway
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16}}
  train: {{epochs: 5}}
variants:
  full: {{}}
seeds: [0, 1]
"""
EXITS = ("stage1", "stage2", "merge")


def metrics_rows() -> pd.DataFrame:
    """Two of five epochs in metrics.csv's columns: epoch 1 evaluated, epoch 2 not (NaN), 10 s and 14 s."""
    rows = []
    for epoch, seconds, evaluated in ((1, 10.0, True), (2, 14.0, False)):
        row = {"epoch": epoch, "step": 4 * epoch, "lr": 0.1, "train_loss": 2.0}
        for i, name in enumerate(EXITS):
            row[f"train_loss_{name}"], row[f"train_acc_{name}"] = 2.0, 20.0 + i
            for split, base in (("calib", 30.0), ("test", 40.0)):
                row[f"{split}_loss_{name}"] = 1.5 if evaluated else float("nan")
                row[f"{split}_acc_{name}"] = base + i + 0.25 if evaluated else float("nan")
        row["epoch_time"] = seconds
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture()
def experiment(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(out=tmp_path / "res")))
    return load_spec(spec)


def midway_folder(experiment):
    run = experiment.runs[0]
    folder = run_dir(experiment, run)
    folder.mkdir(parents=True)
    save_yaml(run.config, folder / "config.yaml")
    metrics_rows().to_csv(folder / METRICS_FILE, index=False)
    write_status(folder, RUNNING, pid=12345)
    return run, folder


def test_run_progress_reads_epoch_accuracy_and_time_left(experiment):
    _, folder = midway_folder(experiment)
    progress = run_progress(folder)
    assert (progress["epoch"], progress["epochs"]) == (2, 5)
    # the last evaluated row is epoch 1; its last exit's test accuracy
    assert progress["accuracy"] == pytest.approx(42.25) and progress["accuracy_column"] == "test_acc_merge"
    assert progress["seconds_left"] == pytest.approx(3 * 12.0)  # 3 epochs left at a mean of 12 s


def test_run_progress_falls_back_to_calibration_accuracy(experiment):
    _, folder = midway_folder(experiment)
    rows = metrics_rows().drop(columns=[f"test_{kind}_{name}" for kind in ("loss", "acc") for name in EXITS])
    rows.to_csv(folder / METRICS_FILE, index=False)
    progress = run_progress(folder)
    assert progress["accuracy"] == pytest.approx(32.25) and progress["accuracy_column"] == "calib_acc_merge"


def test_status_shows_a_locked_run_midway(experiment, capsys):
    run, folder = midway_folder(experiment)
    with run_lock(folder) as held:
        assert held
        states = {row["run_id"]: row["state"] for row in experiment_status(experiment)}
        assert states[run.run_id] == RUNNING
        assert main(["status", str(experiment.path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(run.run_id) and "2/5" in x)
    assert "42.25% (test_acc_merge)" in line
    assert "about 0:36" in line  # (5 - 2) x 12 s
    # once the lock is released the run is interrupted, and no progress line is shown
    assert main(["status", str(experiment.path)]) == 0
    out = capsys.readouterr().out
    assert "2/5" not in out and "interrupted" in out


def test_show_progress_bar_follows_setting_and_worker_environment(monkeypatch):
    monkeypatch.delenv(NO_BAR_ENV, raising=False)
    assert show_progress_bar(True) is True and show_progress_bar(False) is False
    assert show_progress_bar(True, is_main=False) is False
    monkeypatch.setenv(NO_BAR_ENV, "1")
    assert show_progress_bar(True) is False and show_progress_bar(None) is False


def test_runner_worker_turns_the_progress_bar_off(experiment, monkeypatch):
    monkeypatch.delenv(NO_BAR_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the worker narrows it; restored after the test
    work, results = queue.Queue(), queue.Queue()
    work.put(None)  # no run: the worker sets itself up and returns
    _worker(experiment.raw, str(experiment.path), [], str(experiment.results_dir), ["cpu"],
            {"CUDA_VISIBLE_DEVICES": ""}, [], work, results)
    assert show_progress_bar(True) is False
    assert results.empty()
    # the switch is the environment, not the configuration: the runs keep their ids
    assert [r.run_id for r in load_spec(experiment.path).runs] == [r.run_id for r in experiment.runs]
