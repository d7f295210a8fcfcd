"""Nothing finished is lost, skipped or mixed: a results folder belongs to one experiment; its tables list
every finished run in it, with how each was evaluated; a re-evaluation killed at any of its writes leaves
the run to be evaluated again, never done with files of two evaluations; readers never make a runner skip
a run; damaged files are named."""
import fcntl
import json
import os
import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dynexit.cli import main as cli_main
from dynexit.runs.aggregate import aggregate
from dynexit.runs.execute import execute
from dynexit.runs.folders import (
    DONE,
    MARK_FILE,
    STALE,
    evaluation_changes,
    experiment_status,
    read_status,
    run_dir,
    run_lock,
    run_state,
)
from dynexit.runs.runner import run_experiment
from dynexit.runs.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = """
name: safety
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16, input_size: 16}}
  data: {{name: digits, image_size: 16, train_subset: 128, calib_size: 48, test_subset: 64}}
  train: {{epochs: 1, batch_size: 32, progress: false, tensorboard: false}}
  eval: {{grid: official, criterion: max_softmax, batch_size: 64}}
seeds: [{seed}]
"""
OUTPUTS = ("logits_calib.npz", "logits_test.npz", "curve.csv", "anytime.csv", "summary.json")


def write_spec(path: Path, results: Path, seed: int = 0, name: str = "safety", **eval_changes) -> Path:
    raw = yaml.safe_load(textwrap.dedent(SPEC.format(out=results, seed=seed)))
    raw["name"] = name
    raw["base"]["eval"].update(eval_changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, trained once; tests work on copies."""
    folder = tmp_path_factory.mktemp("safety")
    experiment = load_spec(write_spec(folder / "spec.yaml", folder / "results"))
    assert [o.state for o in run_experiment(experiment, devices="cpu")] == [DONE]
    return folder / "results"


def copy_of(trained: Path, tmp_path: Path, **eval_changes):
    results = tmp_path / "results"
    shutil.copytree(trained, results)
    experiment = load_spec(write_spec(tmp_path / "spec.yaml", results, **eval_changes))
    return experiment, run_dir(experiment, experiment.runs[0])


def contents(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


# --------------------------------------------------------------------------- the results folder's owner

def test_a_users_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "runs.csv").write_text("my,own\n1,2\n")
    spec = write_spec(tmp_path / "spec.yaml", mine)
    for argv in (["run", str(spec), "--devices", "cpu", "--dry-run"], ["run", str(spec), "--devices", "cpu"]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert str(mine) in err and MARK_FILE in err and "--out or the spec's results_dir" in err
    assert sorted(p.name for p in mine.iterdir()) == ["runs.csv"]
    assert (mine / "runs.csv").read_text() == "my,own\n1,2\n"


def test_another_experiments_folder_is_refused_naming_both(trained, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(trained, results)
    before = (results / "runs.csv").read_bytes()
    spec = write_spec(tmp_path / "other.yaml", results, name="other")
    assert cli_main(["run", str(spec), "--devices", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "'safety'" in err and "'other'" in err
    assert (results / "runs.csv").read_bytes() == before
    assert json.loads((results / MARK_FILE).read_text()) == {"experiment": "safety"}


def test_a_folder_written_before_marks_is_taken_by_its_own_experiment(trained, tmp_path):
    experiment, folder = copy_of(trained, tmp_path)
    (experiment.results_dir / MARK_FILE).unlink()
    assert run_experiment(experiment, devices="cpu") == []  # its experiment.yaml names it: nothing to do
    assert json.loads((experiment.results_dir / MARK_FILE).read_text()) == {"experiment": "safety"}


# --------------------------------------------------------------------------- every finished run listed

def test_runs_of_another_spec_of_the_experiment_stay_in_its_tables(trained, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(trained, results)
    first = load_spec(write_spec(tmp_path / "first.yaml", results)).runs[0].run_id
    second = load_spec(write_spec(tmp_path / "second.yaml", results, seed=1))
    assert [o.state for o in run_experiment(second, devices="cpu")] == [DONE]
    runs = pd.read_csv(results / "runs.csv", dtype={"run_id": str})
    assert list(runs["run_id"]) == [second.runs[0].run_id, first]  # the spec's runs first, then the others
    assert list(runs["seed"]) == [1, 0]
    index = pd.read_csv(results / "index.csv", dtype={"run_id": str})
    assert set(index["run_id"]) == {first, second.runs[0].run_id}
    assert set(pd.read_csv(results / "curves.csv", dtype={"run_id": str})["run_id"]) == set(runs["run_id"])
    assert cli_main(["status", str(results)]) == 0  # the folder's experiment.yaml is now the second spec
    out = capsys.readouterr().out
    assert f"{first} " in out and "1 other run folders" in out


def test_runs_csv_says_how_each_run_was_evaluated(trained, tmp_path):
    experiment, folder = copy_of(trained, tmp_path, criterion="entropy")
    run_experiment(experiment, devices="cpu")
    row = pd.read_csv(experiment.results_dir / "runs.csv").iloc[0]
    assert (row["eval.criterion"], row["eval.grid"], bool(row["eval.use_ema"]), row["eval.batch_size"]) == (
        "entropy", "official", False, 64)
    curves = pd.read_csv(experiment.results_dir / "curves.csv")
    assert set(curves["eval.criterion"]) == {"entropy"}


@pytest.mark.parametrize("damage", ["summary.json", "curve.csv", "status.json"])
def test_a_damaged_run_file_is_named_and_the_other_runs_stay(trained, tmp_path, caplog, damage):
    experiment, folder = copy_of(trained, tmp_path)
    text = (folder / damage).read_text()
    (folder / damage).write_text(text[: len(text) // 2])
    runs, _ = aggregate(experiment)
    assert runs.empty
    assert str(folder / damage) in caplog.text


# --------------------------------------------------------------------------- re-evaluation killed

class Killed(BaseException):
    """A kill: nothing of the process's own error handling runs."""


def count_writes(monkeypatch, kill_at: int | None) -> list[str]:
    """Counts the file replacements (every dynexit write is one); kills the process before write ``kill_at``."""
    real = os.replace
    writes: list[str] = []

    def replace(src, dst, *args, **kwargs):
        if kill_at is not None and len(writes) + 1 == kill_at:
            raise Killed(dst)
        writes.append(Path(dst).name)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return writes


@pytest.mark.parametrize("change", [{"use_ema": True}, {"criterion": "entropy"}])
def test_a_re_evaluation_killed_at_any_write_is_evaluated_again_never_done_mixed(trained, tmp_path, monkeypatch,
                                                                               change):
    reference, ref_folder = copy_of(trained, tmp_path / "reference", **change)
    with monkeypatch.context() as m:
        writes = count_writes(m, None)
        execute(reference, reference.runs[0], ["cpu"])
    assert {"eval.json", "summary.json", "curve.csv"} <= set(writes)
    done = contents(ref_folder)
    original = contents(trained / "runs" / ref_folder.name)
    new_eval = reference.runs[0].config.eval
    old_eval = load_spec(write_spec(tmp_path / "old.yaml", tmp_path / "x")).runs[0].config.eval
    for kill_at in range(1, len(writes) + 1):
        experiment, folder = copy_of(trained, tmp_path / f"kill{kill_at}", **change)
        with monkeypatch.context() as m:
            count_writes(m, kill_at)
            with pytest.raises(Killed):
                execute(experiment, experiment.runs[0], ["cpu"])
        now = contents(folder)
        # With the new settings, or with the old ones restored: evaluated again, or consistent with them.
        for eval_cfg, consistent in ((new_eval, done), (old_eval, original)):
            assert evaluation_changes(folder, eval_cfg) or now == consistent, (kill_at, writes[kill_at - 1])
        assert run_state(folder, new_eval) in (STALE, DONE)
        runs, _ = aggregate(experiment)
        if not runs.empty:  # a row only for one complete evaluation, the one its record states
            assert now in (done, original)
            assert not evaluation_changes(folder, new_eval if now == done else old_eval)
        execute(experiment, experiment.runs[0], ["cpu"])  # the next runner finishes it
        assert run_state(folder, new_eval) == DONE and contents(folder) == done, kill_at


# --------------------------------------------------------------------------- locks

def test_a_reader_probing_the_lock_does_not_make_a_runner_skip_the_run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").touch()
    with open(folder / ".lock") as reader:
        fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a status check, caught mid-probe
        assert run_state(folder) != "running"  # two readers do not see each other as a runner
        fcntl.flock(reader, fcntl.LOCK_UN)
    with run_lock(folder) as acquired:
        assert acquired
        assert run_state(folder) == "running"  # a reader sees the runner


def test_a_runner_waits_out_a_short_probe(tmp_path):
    import threading

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").touch()
    reader = open(folder / ".lock")
    fcntl.flock(reader, fcntl.LOCK_SH)
    threading.Timer(0.3, reader.close).start()  # the probe ends while the runner waits
    with run_lock(folder) as acquired:
        assert acquired
    with run_lock(folder, wait=0.0) as first, run_lock(folder, wait=0.2) as second:
        assert first and not second  # a runner really holding it keeps the others out


def test_train_into_a_locked_folder_is_refused(tmp_path, capsys):
    spec = yaml.safe_load(textwrap.dedent(SPEC.format(out=tmp_path, seed=0)))["base"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    with run_lock(out) as acquired:
        assert acquired
        assert cli_main(["train", str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "locked" in err
    assert not (out / "metrics.csv").exists()


def test_status_lists_a_run_whose_status_is_done(trained, tmp_path):
    experiment, folder = copy_of(trained, tmp_path)
    assert [row["state"] for row in experiment_status(experiment)] == [DONE]
    assert read_status(folder)["state"] == DONE


# --------------------------------------------------------------------------- TensorBoard links, migration

def test_tensorboard_links_are_unique_per_run(tmp_path):
    from dynexit.runs.execute import tensorboard_name

    raw = yaml.safe_load(textwrap.dedent(SPEC.format(out=tmp_path / "r", seed=0)))
    raw["variants"] = {"lr/hi": {"train.lr": 0.002}, "lr-hi": {"train.lr": 0.003}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    experiment = load_spec(spec)
    names = [tensorboard_name(experiment, run) for run in experiment.runs]
    assert len(set(names)) == 2 and all("/" not in n for n in names)
    assert [n.endswith(run.run_id) for n, run in zip(names, experiment.runs)] == [True, True]


def test_migration_moves_tensorboard_links_and_reports_unreadable_folders(trained, tmp_path, caplog):
    from dynexit.runs.migration import _relink_tensorboard, plan_migration

    experiment, folder = copy_of(trained, tmp_path)
    (experiment.results_dir / "runs" / "junk").mkdir()  # no config.yaml
    assert plan_migration(experiment.path, threads=1) == []  # reported, not a stop
    assert str(experiment.results_dir / "runs" / "junk") in caplog.text
    links = experiment.results_dir / "tb"
    links.mkdir()
    (folder / "tb").mkdir()
    os.symlink(os.path.relpath(folder / "tb", links), links / "base_seed0", target_is_directory=True)
    new = folder.parent / "0000000000"
    folder.rename(new)
    _relink_tensorboard(experiment.results_dir, folder, new)
    assert (links / "base_seed0").resolve() == (new / "tb").resolve()


# --------------------------------------------------------------------------- reports never mix evaluations

def test_a_report_refuses_to_pool_runs_evaluated_differently_and_names_what_it_leaves_out(trained, tmp_path,
                                                                                           capsys):
    results = tmp_path / "results"
    shutil.copytree(trained, results)
    first = load_spec(write_spec(tmp_path / "first.yaml", results)).runs[0].run_id
    second = load_spec(write_spec(tmp_path / "second.yaml", results, seed=1, criterion="entropy"))
    assert [o.state for o in run_experiment(second, devices="cpu")] == [DONE]
    junk = results / "runs" / "junk"
    junk.mkdir()
    (junk / "status.json").write_text(json.dumps({"state": "failed", "error": "boom"}))
    assert cli_main(["report", str(results), "--formats", "png"]) == 1
    err = capsys.readouterr().err
    assert "evaluated differently" in err and first in err and second.runs[0].run_id in err
    assert "eval.criterion=entropy" in err and "eval.criterion=max_softmax" in err and "--allow-mixed" in err
    assert not (results / "report").exists()  # refused before anything was written
    assert cli_main(["report", str(results), "--formats", "png", "--allow-mixed"]) == 0
    table = (results / "report" / "ablation.md").read_text()
    assert "Pooled over runs evaluated differently (--allow-mixed): base" in table
    assert "run junk (failed: boom)" in table
