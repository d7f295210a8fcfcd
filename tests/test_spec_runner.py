"""Spec expansion and validation, device planning, run states and aggregation, with a stand-in pipeline
that writes what the real one writes."""
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import dynexit.runs.pipeline
from dynexit.runs.folders import (
    DONE,
    EVAL_FILE,
    FAILED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    SUMMARY_FILE,
    evaluation_record,
    experiment_status,
    run_lock,
    run_state,
    write_status,
)
from dynexit.runs.runner import plan_workers, run_experiment
from dynexit.runs.spec import load_spec


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


SPEC = """
name: demo
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16}}
  train: {{epochs: 1}}
variants:
  full: {{}}
  no_x2z: {{model.x2z: false}}
  static: {{model.static: true}}
grid:
  train.batch_size: [16, 32]
zip:
  - {{model.num_latents: [16, 32], eval.batch_size: [64, 128]}}
seeds: [0, 1]
"""


def test_spec_expands_to_the_product_with_distinct_ids(tmp_path):
    experiment = load_spec(write_spec(tmp_path, SPEC.format(out=tmp_path / "res")))
    assert len(experiment.runs) == 3 * 2 * 2 * 2
    assert len({r.run_id for r in experiment.runs}) == 24
    assert experiment.grid_keys == ["eval.batch_size", "model.num_latents", "model.static", "model.x2z", "seed",
                                    "train.batch_size"]
    run = next(r for r in experiment.runs if r.variant == "no_x2z" and r.overrides["model.num_latents"] == 32)
    assert run.config.model.x2z is False and run.config.eval.batch_size == 128  # zipped together
    assert run.config.train.epochs == 1
    # The id is a hash of the resolved configuration: stable, and --set changes it.
    again = load_spec(write_spec(tmp_path, SPEC.format(out=tmp_path / "res")))
    assert [r.run_id for r in again.runs] == [r.run_id for r in experiment.runs]
    changed = load_spec(tmp_path / "spec.yaml", ["train.epochs=2"])
    assert changed.runs[0].config.train.epochs == 2
    assert changed.runs[0].run_id != experiment.runs[0].run_id


@pytest.mark.parametrize("bad,message", [
    ("  train: {epochz: 1}", r"train\.epochz.*line 6"),
    ("  model: {name: tiny_perceiver_t16, x2z: sometimes}", r"model\.x2z"),
    ("  model: {name: no_such_model}", r"no_such_model.*tiny_perceiver_t16"),
    ("  model: {name: tiny_perceiver_t16, depth_factor: [1, 1]}", "depth_factor"),
])
def test_bad_specs_name_the_key_and_write_nothing(tmp_path, bad, message):
    out = tmp_path / "res"
    model = "" if "model:" in bad else "  model: {name: tiny_perceiver_t16}\n  data: {}\n"
    text = f"name: bad\nresults_dir: {out}\nbase:\n{model}{bad}\n"
    with pytest.raises(ValueError, match=message) as err:
        run_experiment(load_spec(write_spec(tmp_path, text)))
    assert "spec.yaml" in str(err.value)
    assert not out.exists()


def test_bad_grid_values(tmp_path):
    base = "name: g\nbase: {model: {name: tiny_perceiver_t16}}\n"
    with pytest.raises(ValueError, match="train.nope"):
        load_spec(write_spec(tmp_path, base + "grid: {train.nope: [1, 2]}\n"))
    with pytest.raises(ValueError, match="different lengths"):
        load_spec(write_spec(tmp_path, base + "zip: [{seed: [1, 2], train.epochs: [1]}]\n"))
    with pytest.raises(ValueError, match="same configuration"):
        load_spec(write_spec(tmp_path, base + "variants: {a: {}, b: {seed: 0}}\n"))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("bad,key", [
    ("{train.lr: -1}", "train.lr"),
    ("{data.calib_size: 0}", "data.calib_size"),
    ("{eval.criterion: confidence}", "eval.criterion"),
    ("{train.min_lr: 0.1}", "train.min_lr"),
    ("{train.loss_weights.exit9: 1.0}", "train.loss_weights: 'exit9' is not an exit"),
])
def test_one_impossible_variant_writes_nothing_and_is_named(tmp_path, bad, key, monkeypatch):
    """A value that only training, the data or the evaluation would refuse is refused for the whole grid
    before any folder or file exists: no run folder, error.txt, status.json, runs.csv or curves.csv."""
    monkeypatch.setattr(dynexit.runs.pipeline, "run_pipeline", fake_pipeline())
    out = tmp_path / "res"
    text = SPEC.format(out=out).replace("variants:\n", f"variants:\n  culprit: {bad}\n")
    with pytest.raises(ValueError, match=rf"variant 'culprit'.*{key}") as err:
        run_experiment(load_spec(write_spec(tmp_path, text)), devices="cpu")
    assert "spec.yaml" in str(err.value)
    assert not out.exists()


def test_the_runner_checks_every_run_itself(tmp_path, monkeypatch):
    """An experiment changed after loading (or built in code) is checked again by the runner: the error
    names the run, its variant and the key; an unknown executor is refused too; nothing is written."""
    monkeypatch.setattr(dynexit.runs.pipeline, "run_pipeline", fake_pipeline())
    out = tmp_path / "res"
    experiment = load_spec(write_spec(tmp_path, SPEC.format(out=out)))
    culprit = experiment.runs[5]
    culprit.config.eval.budgets = [0.5, -1.0]
    with pytest.raises(ValueError, match=rf"run {culprit.run_id} \(variant '{culprit.variant}'.*eval\.budgets"):
        run_experiment(experiment, devices="cpu")
    assert not out.exists()
    experiment = load_spec(tmp_path / "spec.yaml")
    experiment.executor.kind = "cloud"
    with pytest.raises(ValueError, match="executor.kind"):
        run_experiment(experiment, devices="cpu")
    with pytest.raises(ValueError, match="gpu:0"):
        run_experiment(load_spec(tmp_path / "spec.yaml"), devices="gpu:0")
    assert not out.exists()


def test_plan_workers():
    assert plan_workers("auto", None, 0) == [["cpu"]]
    assert plan_workers("cpu", 3, 4) == [["cpu"]] * 3
    assert plan_workers("auto", None, 2) == [["cuda:0"], ["cuda:1"]]
    assert plan_workers("cuda:1,cuda:3", None, 4) == [["cuda:1"], ["cuda:3"]]
    assert plan_workers("auto", None, 4, gpus_per_run=2) == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    with pytest.raises(ValueError, match="cuda:2 does not exist"):
        plan_workers("cuda:2", None, 2)
    with pytest.raises(ValueError, match="gpu:0"):
        plan_workers("gpu:0", None, 1)
    with pytest.raises(ValueError, match="groups of gpus_per_run=2"):
        plan_workers("cuda:0,cuda:1,cuda:2", None, 3, gpus_per_run=2)


def fake_pipeline(fail_variant=None):
    """Writes what the real pipeline writes, from the configuration alone."""
    def run(cfg, folder, devices, name=None):
        if cfg.model.static and fail_variant == "static":
            raise RuntimeError("static exploded")
        acc = 50.0 + cfg.seed + (10 if cfg.model.x2z is not False else 0)
        curve = pd.DataFrame({"test_expected_cost": [0.1, 0.2], "test_accuracy": [acc - 1, acc],
                              "calib_accuracy": [acc, acc], "calib_expected_cost": [0.1, 0.2]})
        curve.to_csv(folder / "curve.csv", index=False)
        (folder / SUMMARY_FILE).write_text(json.dumps({"acc_final": acc, "params": 7}))
        record = evaluation_record(cfg.eval)  # the eval settings of these outputs
        (folder / EVAL_FILE).write_text(json.dumps(record))
        return {}
    return run


def test_runs_aggregate_skip_and_retry(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, SPEC.format(out=tmp_path / "res"))
    experiment = load_spec(spec)
    monkeypatch.setattr(dynexit.runs.pipeline, "run_pipeline", fake_pipeline(fail_variant="static"))
    outcomes = run_experiment(experiment, devices="cpu")
    assert sorted(o.state for o in outcomes).count(FAILED) == 8
    runs = pd.read_csv(tmp_path / "res" / "runs.csv")
    assert len(runs) == 16 and runs["run_id"].is_unique
    assert set(runs["variant"]) == {"full", "no_x2z"}
    assert (runs.loc[runs["variant"] == "full", "acc_final"] - runs.loc[runs["variant"] == "full", "seed"]).eq(60).all()
    curves = pd.read_csv(tmp_path / "res" / "curves.csv")
    assert len(curves) == 32 and set(curves.columns) >= {"run_id", "variant", "point", "test_accuracy", "seed"}
    states = {row["run_id"]: row for row in experiment_status(experiment)}
    failed = [row for row in states.values() if row["state"] == FAILED]
    assert len(failed) == 8 and all("static exploded" in row["error"] for row in failed)
    # Again: finished runs are skipped, the failed ones retried (and fixed now).
    monkeypatch.setattr(dynexit.runs.pipeline, "run_pipeline", fake_pipeline())
    outcomes = run_experiment(load_spec(spec), devices="cpu")
    assert len(outcomes) == 8 and all(o.state == DONE for o in outcomes)
    runs = pd.read_csv(tmp_path / "res" / "runs.csv")
    assert len(runs) == 24 and runs["run_id"].is_unique
    assert run_experiment(load_spec(spec), devices="cpu") == []
    # TensorBoard: one link per run, named by variant, the grid keys it sets, seed and run id, to its tb folder
    links = sorted((tmp_path / "res" / "tb").iterdir())
    assert len(links) == 24 and all(link.is_symlink() for link in links)
    by_name = {link.name: link for link in links}
    row = runs[(runs["variant"] == "no_x2z") & (runs["seed"] == 1) & (runs["train.batch_size"] == 32)
               & (runs["model.num_latents"] == 16)]
    name = f"no_x2z_eval.batch_size=64_model.num_latents=16_train.batch_size=32_seed1_{row['run_id'].item()}"
    assert by_name[name].resolve() == (tmp_path / "res" / "runs" / row["run_id"].item() / "tb").resolve()


def test_run_states(tmp_path):
    folder = tmp_path / "run"
    assert run_state(folder) == PENDING
    with run_lock(folder) as acquired:
        assert acquired
        assert run_state(folder) == RUNNING
        with run_lock(folder) as second:
            assert not second  # a second runner never executes the same run
    write_status(folder, RUNNING, pid=1)
    assert run_state(folder) == INTERRUPTED  # marked running but nobody holds the lock: killed
    write_status(folder, DONE)
    assert run_state(folder) == DONE
    (folder / "status.json").write_text("{broken")
    with pytest.raises(ValueError, match="status.json"):
        run_state(folder)


def test_status_command_from_results_folder(tmp_path, monkeypatch, capsys):
    from dynexit.cli import main

    spec = write_spec(tmp_path, SPEC.format(out=tmp_path / "res"))
    monkeypatch.setattr(dynexit.runs.pipeline, "run_pipeline", fake_pipeline(fail_variant="static"))
    assert main(["run", str(spec), "--dry-run"]) == 0
    assert "pending: 24" in capsys.readouterr().out
    assert not (tmp_path / "res").exists()  # a dry run writes nothing
    assert main(["run", str(spec)]) == 1  # some runs failed
    capsys.readouterr()
    assert main(["status", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "done: 16" in out and "failed: 8" in out and "static exploded" in out


def test_progress_counts_runs_and_estimates_the_time_left_in_rounds_of_parallel_runs(monkeypatch, caplog):
    import logging

    import dynexit.runs.runner
    from dynexit.runs.execute import Outcome
    from dynexit.runs.runner import Progress

    clock = [1000.0]
    monkeypatch.setattr(dynexit.runs.runner.time, "monotonic", lambda: clock[0])
    progress = Progress(total=14, done_before=0, todo=14, parallel=2)
    with caplog.at_level(logging.INFO, logger="dynexit.runs.runner"):
        clock[0] += 300  # the first of two runs side by side: 12 more after the other, 6 rounds of 5 min
        progress.finished(Outcome("a", DONE))
        clock[0] += 2
        progress.finished(Outcome("b", FAILED, "boom"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "progress: 1/14 runs done, 5:00 elapsed, about 35:00 left"
    assert lines[1] == "progress: 1/14 runs done, 1 failed, 5:02 elapsed, about 30:12 left"
