"""The runner for real, with the real pipeline on digits: a grid started in a subprocess, killed with
SIGKILL in the middle of a run, and started again ends with exactly the results of an uninterrupted grid,
one row per run in every file; and runs sent through submitit's local executor."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import torch

from dynexit.runs.folders import DONE, RUNNING, read_status, run_dir
from dynexit.runs.runner import run_experiment
from dynexit.runs.spec import load_spec

ROOT = Path(__file__).parent.parent
EPOCHS = 3

SPEC = """
name: resume
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16, input_size: 16}}
  data: {{name: digits, image_size: 16, train_subset: 512, calib_size: 64, test_subset: 128}}
  train: {{epochs: {epochs}, batch_size: 32, lr: 2.0e-3, warmup_epochs: 1, eval_every: {epochs},
          progress: false, tensorboard: false}}
variants:
  full: {{}}
  no_z2x: {{model.z2x: false}}
"""


def write_spec(folder: Path, results: Path) -> Path:
    path = folder / f"{results.name}.yaml"
    path.write_text(textwrap.dedent(SPEC.format(out=results, epochs=EPOCHS)))
    return path


def start(spec: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # each run sets its own threads
    env["PYTHONPATH"] = str(ROOT)
    # two CPU workers: the runs train side by side in worker processes of one thread each
    return subprocess.Popen([sys.executable, "-m", "dynexit", "run", str(spec), "--devices", "cpu", "--workers", "2"],
                            cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out


def epochs_done(folder: Path) -> int:
    metrics = folder / "metrics.csv"
    return max(0, len(metrics.read_text().splitlines()) - 1) if metrics.is_file() else 0


def test_a_grid_killed_mid_run_resumes_to_the_results_of_an_uninterrupted_one(tmp_path):
    killed_spec = write_spec(tmp_path, tmp_path / "killed")
    experiment = load_spec(killed_spec)
    first = run_dir(experiment, experiment.runs[0])

    proc = start(killed_spec)
    deadline = time.time() + 300
    while epochs_done(first) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Killed in the middle of training the first run: a checkpoint, and the rest still to do.
    assert read_status(first)["state"] == RUNNING and 1 <= epochs_done(first) < EPOCHS
    assert not (first / "summary.json").exists()

    finish(start(killed_spec))  # the same command again
    finish(start(write_spec(tmp_path, tmp_path / "whole")))  # and a grid that was never interrupted

    results = {name: load_spec(tmp_path / f"{name}.yaml") for name in ("killed", "whole")}
    for exp in results.values():
        for run in exp.runs:
            folder = run_dir(exp, run)
            status = read_status(folder)
            assert status["state"] == DONE and status["threads"] == run.config.train.threads == 1
            assert list(pd.read_csv(folder / "metrics.csv")["epoch"]) == list(range(1, EPOCHS + 1))
    runs = {name: pd.read_csv(exp.results_dir / "runs.csv") for name, exp in results.items()}
    curves = {name: pd.read_csv(exp.results_dir / "curves.csv") for name, exp in results.items()}
    for name in results:
        assert len(runs[name]) == 2 and runs[name]["run_id"].is_unique
        assert not curves[name].duplicated(["run_id", "point"]).any()
        assert set(curves[name]["run_id"]) == set(runs[name]["run_id"])
    # Everything but the wall time is identical, down to the weights.
    timing = [c for c in runs["whole"].columns if c.endswith("seconds")]
    pd.testing.assert_frame_equal(runs["killed"].drop(columns=timing), runs["whole"].drop(columns=timing))
    pd.testing.assert_frame_equal(curves["killed"], curves["whole"])
    assert runs["whole"]["acc_final"].min() > 50  # trained models, not chance (10 classes)
    for run in experiment.runs:
        a = torch.load(run_dir(results["killed"], run) / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(run_dir(results["whole"], run) / "checkpoint.pt", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runs_through_submitits_local_executor(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(out=tmp_path / "res", epochs=1)) + textwrap.dedent("""
        executor: {kind: submitit_local, cpus_per_task: 1, timeout_min: 10}
        """))
    experiment = load_spec(spec)
    outcomes = run_experiment(experiment)
    assert sorted(o.run_id for o in outcomes) == sorted(r.run_id for r in experiment.runs)
    assert all(o.state == DONE for o in outcomes), [o.error for o in outcomes]
    for run in experiment.runs:  # each run in its own job process, not in this one
        assert read_status(run_dir(experiment, run))["pid"] != os.getpid()
    assert len(list((tmp_path / "res" / "submitit").glob("*/*_result.pkl"))) == 2
    runs = pd.read_csv(tmp_path / "res" / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(r.run_id for r in experiment.runs)
    assert (runs["acc_final"] > 10).all() and runs["params"].nunique() == 2
    assert run_experiment(load_spec(spec)) == []  # done: nothing is submitted again
