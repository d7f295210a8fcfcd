"""Errors that say what to do: every file error names its path, costs must increase from exit to exit,
a dynexit checkpoint given to the official converter is named as such, a damaged run checkpoint says how
to start the run over, YAML keys given twice are refused, and each malformed spec section is named."""
import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import dynexit
from dynexit.cli import main as cli_main
from dynexit.config import RunConfig, load_run_config, merge
from dynexit.logits import load_logits, save_logits
from dynexit.models.checkpoint import save_model
from dynexit.policies import anytime_accuracy, budgeted_curve
from dynexit.runs.spec import SpecFile, expand, load_spec
from dynexit.search.thresholds import threshold_problem
from dynexit.training import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py

TINY_BASE = {"model": {"name": "tiny_perceiver_t16", "input_size": 16},
             "data": {"name": "digits", "image_size": 16, "train_subset": 64, "test_subset": 32, "calib_size": 32},
             "train": {"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False}}


def logits_file(path: Path, exits: int = 3) -> Path:
    rng = np.random.default_rng(0)
    save_logits(path, rng.normal(size=(exits, 40, 5)), rng.integers(0, 5, 40))
    return path


# --------------------------------------------------------------------------------------- logits files

@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped bytes", "not a zip"])
def test_a_damaged_logits_file_is_named(tmp_path, damage):
    path = logits_file(tmp_path / "logits_test.npz")
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "not a zip": b"PK\x03\x04" + b"x" * 100,
               "flipped bytes": data[:300] + bytes(b ^ 0xFF for b in data[300:340]) + data[340:]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(ValueError) as err:
        load_logits(path)
    assert str(path) in str(err.value) and "logits" in str(err.value)


def test_curve_cli_names_a_truncated_logits_file_in_one_line(tmp_path, capsys):
    calib, test = logits_file(tmp_path / "calib.npz"), logits_file(tmp_path / "test.npz")
    test.write_bytes(test.read_bytes()[:100])
    status = cli_main(["curve", "--calib", str(calib), "--test", str(test), "--costs", "1,2,3",
                       "--out", str(tmp_path / "curve.csv")])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and str(test) in err
    assert not (tmp_path / "curve.csv").exists()


# --------------------------------------------------------------------------------------------- costs

def two_splits(exits: int = 3):
    rng = np.random.default_rng(1)
    return (rng.normal(size=(exits, 50, 4)), rng.integers(0, 4, 50), rng.normal(size=(exits, 60, 4)),
            rng.integers(0, 4, 60))


BAD_COSTS = [([0.5, 0.5, 1.0], "b", "0.5"), ([1.0, 0.8, 1.2], "b", "0.8"), ([0.2, 0.9, 0.4], "c", "0.4")]


@pytest.mark.parametrize("costs, exit_name, value", BAD_COSTS)
def test_costs_must_increase_strictly_wherever_they_are_given(costs, exit_name, value):
    calib_logits, calib_targets, test_logits, test_targets = two_splits()
    names = ["a", "b", "c"]
    calls = [lambda: budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, costs, exit_names=names),
             lambda: anytime_accuracy(test_logits, test_targets, costs, exit_names=names),
             lambda: threshold_problem(calib_logits, calib_targets, test_logits, test_targets, costs,
                                       exit_names=names)]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "increase strictly" in message and f"exit {exit_name!r} costs {value}" in message, message
    # Unnamed exits are named by their index.
    with pytest.raises(ValueError, match=r"exit '1' costs"):
        anytime_accuracy(test_logits, test_targets, [1.0, 1.0, 2.0])
    assert len(anytime_accuracy(test_logits, test_targets, [0.1, 0.2, 0.3])) == 3  # increasing: fine


def test_cli_refuses_non_increasing_costs_naming_file_exits_and_values(tmp_path, capsys):
    calib, test = logits_file(tmp_path / "calib.npz"), logits_file(tmp_path / "test.npz")
    costs = tmp_path / "costs.csv"
    pd.DataFrame({"exit": ["early", "mid", "last"], "gmacs": [0.3, 0.9, 0.9]}).to_csv(costs, index=False)
    for command in (["curve"], ["search", "thresholds", "--budgets", "0.5"]):
        out = tmp_path / "out.csv"
        status = cli_main(command + ["--calib", str(calib), "--test", str(test), "--costs", str(costs),
                                     "--out", str(out)])
        err = capsys.readouterr().err
        assert status == 1 and err.count("\n") == 1, err
        assert str(costs) in err and "exit 'last' costs 0.9" in err and "'mid'" in err, err
        assert not out.exists()
    status = cli_main(["curve", "--calib", str(calib), "--test", str(test), "--costs", "3,2,1",
                       "--out", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert status == 1 and "--costs 3,2,1" in err and "exit '1' costs 2" in err


def test_an_unreadable_costs_file_is_named(tmp_path, capsys):
    calib, test = logits_file(tmp_path / "calib.npz"), logits_file(tmp_path / "test.npz")
    costs = tmp_path / "costs.csv"
    costs.write_bytes(b"\xff\xfe\x00garbage\x00\n\x01")
    status = cli_main(["curve", "--calib", str(calib), "--test", str(test), "--costs", str(costs),
                       "--out", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert status == 1 and str(costs) in err


# -------------------------------------------------------------------------------------- checkpoints

def test_convert_official_names_a_dynexit_checkpoint_in_one_line(tmp_path, capsys):
    model = dynexit.create_model("tiny_perceiver_t16")
    ours = tmp_path / "ours.pt"
    save_model(ours, model)
    state_dict = tmp_path / "state_dict.pth"
    torch.save({"model": model.state_dict()}, state_dict)
    for path, phrase in ((ours, "is a dynexit checkpoint"), (state_dict, "holds dynexit parameter names")):
        status = cli_main(["convert-official", str(path), str(tmp_path / "out.pt"), "--model", "tiny_perceiver_t16"])
        err = capsys.readouterr().err
        assert status == 1 and err.count("\n") == 1, err
        assert str(path) in err and phrase in err
        assert not (tmp_path / "out.pt").exists()
    with pytest.raises(ValueError, match="is a dynexit checkpoint"):
        dynexit.load_official(dynexit.create_model("tiny_perceiver_t16"), ours)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no training state"])
def test_a_damaged_run_checkpoint_says_how_to_start_the_run_over(tmp_path, damage):
    config = merge(RunConfig, TINY_BASE)
    folder = tmp_path / "run"
    result = train(config, folder)
    path = result.checkpoint
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        checkpoint = torch.load(path, weights_only=True)
        del checkpoint["config"], checkpoint["rng"]
        torch.save(checkpoint, path)
    before = path.read_bytes()
    with pytest.raises(ValueError) as err:
        train(merge(RunConfig, TINY_BASE, {"train": {"epochs": 2}}), folder)
    message = str(err.value)
    assert str(path) in message and f"delete {path}" in message and f"run folder {folder}" in message, message
    if damage == "no training state":
        assert "lacks the training state rng, config" in message
    assert path.read_bytes() == before  # nothing is changed


def test_backbone_weights_that_do_not_fit_name_the_file(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=f"{path} does not fit the backbone"):
        dynexit.load_backbone_weights(dynexit.create_model("tiny_perceiver_t16").backbone, path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=f"{path} is not a state dict"):
        dynexit.load_backbone_weights(dynexit.create_model("tiny_perceiver_t16").backbone, path)


# ----------------------------------------------------------------------------------------------- YAML

def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_a_variant_given_twice_is_refused_naming_file_key_and_lines(tmp_path):
    spec = write(tmp_path / "spec.yaml", """
        name: twice
        base: {model: {name: tiny_perceiver_t16}}
        variants:
          full: {}
          no_x2z: {model.x2z: false}
          full: {model.z2x: false}
        """)
    with pytest.raises(ValueError) as err:
        load_spec(spec)
    message = str(err.value)
    assert str(spec) in message and "duplicate key 'full' at line 6" in message and "line 4" in message


def test_duplicate_keys_are_refused_at_any_depth_of_specs_and_run_configs(tmp_path):
    spec = write(tmp_path / "spec.yaml", """
        name: deep
        base:
          train: {epochs: 2, lr: 0.1, epochs: 3}
        """)
    with pytest.raises(ValueError, match=rf"{spec}: duplicate key 'epochs' at line 3"):
        load_spec(spec)
    config = write(tmp_path / "config.yaml", """
        model:
          name: tiny_perceiver_t16
        seed: 1
        seed: 2
        """)
    with pytest.raises(ValueError, match=rf"{config}: duplicate key 'seed' at line 4 \(first given at line 3\)"):
        load_run_config(config)
    # YAML merge keys may still be overridden: that is not a duplicate.
    merged = write(tmp_path / "merged.yaml", """
        name: merged
        base:
          train: &defaults {epochs: 2, lr: 0.1}
        variants:
          slow: {train.lr: 0.01}
        executor: {<<: {kind: local, cpus_per_task: 2}, cpus_per_task: 4}
        """)
    assert load_spec(merged).executor.cpus_per_task == 4


def test_run_config_files_keep_their_values_and_types(tmp_path):
    config = write(tmp_path / "config.yaml", """
        model: {name: tiny_perceiver_t16, x2z: false}
        train: {lr: 1e-3, epochs: 4}
        eval: {budgets: [0.5, 1]}
        """)
    cfg = load_run_config(config)
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 4 and cfg.model.x2z is False
    assert cfg.eval.budgets == [0.5, 1.0]
    assert load_run_config(write(tmp_path / "empty.yaml", "")) == RunConfig()
    with pytest.raises(ValueError, match=rf"{tmp_path / 'list.yaml'}: a run configuration is a mapping"):
        load_run_config(write(tmp_path / "list.yaml", "- model\n- data\n"))


MALFORMED = [
    ("name", ["a", "b"], "'name' must be a non-empty string"),
    ("name", "", "'name' must be a non-empty string"),
    ("description", {"a": 1}, "'description' must be a string"),
    ("results_dir", 3, "'results_dir' must be a folder path"),
    ("base", ["model"], "'base' must be a mapping: a run configuration"),
    ("variants", ["a", "b"], "'variants' must be a mapping of variant name -> overrides"),
    ("variants", {"a": ["model.x2z=false"]}, "'variants' must be a mapping of variant name -> overrides"),
    ("grid", ["train.lr", 0.1], "'grid' must be a mapping of dotted key -> list of values"),
    ("zip", {"model.name": ["a"]}, "'zip' must be a list of groups"),
    ("zip", ["model.name"], "'zip' must be a list of groups"),
    ("seeds", 3, "'seeds' must be a list of integers"),
    ("seeds", [0, "one"], "'seeds' must be a list of integers"),
    ("executor", "slurm", "'executor' must be a mapping"),
]


@pytest.mark.parametrize("section, value, phrase", MALFORMED, ids=[f"{s}={v!r}" for s, v, _ in MALFORMED])
def test_each_malformed_spec_section_is_named_with_what_it_must_be(tmp_path, section, value, phrase):
    raw = {"name": "bad", "base": {"model": {"name": "tiny_perceiver_t16"}}, section: value}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and phrase in message, message
    assert "Cannot merge" not in message


def test_every_spec_section_is_checked_and_unknown_ones_are_named():
    from dynexit.runs.spec import _SECTIONS

    assert set(_SECTIONS) == {f.name for f in dataclasses.fields(SpecFile)}
    with pytest.raises(ValueError, match=r"spec: unknown section 'varients'; a spec has name, "):
        expand({"name": "x", "base": {}, "varients": {"a": {}}})
    # Well-formed sections, including empty ones, still expand.
    experiment = expand({"name": "ok", "base": {"model": {"name": "tiny_perceiver_t16"}}, "variants": {"a": None},
                         "grid": {"train.lr": [0.1, 0.2]}, "zip": [], "seeds": [0, 1], "executor": {"kind": "local"},
                         "results_dir": None, "description": "fine"})
    assert len(experiment.runs) == 4


def test_damaged_run_files_are_named(tmp_path):
    from dynexit.training.loop import load_metrics
    from dynexit.utils import read_csv_file, read_json_file

    (tmp_path / "metrics.csv").write_bytes(b'epoch,loss\n1,"unclosed\n2,3,4,5\n')
    with pytest.raises(ValueError, match=rf"cannot read metrics file {tmp_path / 'metrics.csv'}"):
        load_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"costs file not found: {tmp_path / 'costs.csv'}"):
        read_csv_file(tmp_path / "costs.csv", "costs file")
    (tmp_path / "summary.json").write_text('{"a": 1')
    with pytest.raises(ValueError, match=rf"cannot read run summary {tmp_path / 'summary.json'}"):
        read_json_file(tmp_path / "summary.json", "run summary")
