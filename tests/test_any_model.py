"""Any model meeting the documented multi-exit interface: the example of docs/own-model.md (its module written
to a scratch folder and put on sys.path) goes through `dynexit costs`, early exit (equal to the simulated policy,
batched and one image at a time), a `dynexit run` of a spec and a checkpoint round trip; a model with `forward`
only, bad factory names and bad model sections fail clearly."""
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

import dynexit
from dynexit.cli import main
from dynexit.config import (
    RunConfig,
    exit_loss_weights,
    load_run_config,
    merge,
    to_container,
    validate_run_config,
)
from dynexit.costs import count_costs
from dynexit.inference import early_exit
from dynexit.models.interface import check_multi_exit_model, load_factory
from dynexit.policies import assign_exits, confidence

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_section() -> str:
    """The page's example, up to its section on a new method (a family)."""
    text = PAGE.read_text()
    return text[:text.index("\n## A new method")]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", readme_section(), flags=re.S | re.M)


FORWARD_ONLY = '''
import torch
from torch import nn


class TwoHeads(nn.Module):
    exit_names = ("first", "second")

    def __init__(self, num_classes=10):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head_a = nn.Linear(4, num_classes)
        self.head_b = nn.Linear(4, num_classes)

    def forward(self, x):
        h = self.a(x)
        return [self.head_a(h), self.head_b(h)]


def make(num_classes=10):
    return TwoHeads(num_classes)
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """The documented tiny_exits.py and a forward-only model, importable from a scratch folder."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "tiny_exits.py").write_text(blocks("python")[0])
    (folder / "forward_only.py").write_text(FORWARD_ONLY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", f"{folder}:{Path(__file__).resolve().parents[1]}")
    yield folder
    for name in ("tiny_exits", "forward_only"):
        sys.modules.pop(name, None)


def test_the_readme_example_counts_costs_through_the_cli(user_modules, tmp_path, capsys):
    out = tmp_path / "costs.csv"
    assert main(["costs", "tiny_exits:make_model", "--input-size", "28", "--csv", str(out)]) == 0
    assert "tiny_exits:make_model" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert list(table["exit"]) == ["low", "mid", "high"]
    gmacs = table["gmacs"].to_numpy()
    assert (np.diff(gmacs) > 0).all()
    # By hand: the 3x3 convolutions at 28, 14 and 7 px, BatchNorm (2 per element) and the heads' average
    # pooling (1 per element) of their outputs, and the linear heads.
    convs = [3 * 8 * 9 * 28 * 28, 8 * 16 * 9 * 14 * 14, 16 * 32 * 9 * 7 * 7]
    norm_and_pool = [3 * 8 * 28 * 28, 3 * 16 * 14 * 14, 3 * 32 * 7 * 7]
    heads = [8 * 10, 16 * 10, 32 * 10]
    by_hand = np.cumsum(np.add(np.add(convs, norm_and_pool), heads)) / 1e9
    assert np.allclose(gmacs, by_hand, rtol=1e-9)
    # --set passes any other keyword argument to the factory.
    assert main(["costs", "tiny_exits:make_model", "--input-size", "28", "--set", "model.width=16",
                 "--csv", str(out)]) == 0
    assert pd.read_csv(out)["gmacs"].iloc[-1] > 3 * gmacs[-1]


def test_the_readme_early_exit_block_runs_and_equals_the_simulated_policy(user_modules):
    namespace: dict = {}
    exec(compile(blocks("python")[1], "docs/own-model.md early-exit block", "exec"), namespace)
    tiny, batch = namespace["tiny"], namespace["batch"]
    logits = namespace["tiny_logits"]
    # Thresholds halfway between two confidences (no sample sits on one), so every exit takes some samples.
    conf = confidence(logits)

    def between(values, k):
        ordered = np.sort(values)
        return float(ordered[k] + ordered[k + 1]) / 2

    spread = [between(conf[0], 9), between(conf[1][conf[0] < between(conf[0], 9)], 4), 0.0]
    for thresholds in (spread, [2.0, 0.0, 0.0]):
        simulated = assign_exits(conf, thresholds)
        preds, exits = early_exit(tiny, batch, thresholds)
        assert exits.tolist() == simulated.tolist()
        assert preds.tolist() == logits[simulated, np.arange(len(batch))].argmax(-1).tolist()
        for i in range(len(batch)):  # one image at a time: the same decisions
            p1, e1 = early_exit(tiny, batch[i:i + 1], thresholds)
            assert (int(p1), int(e1)) == (int(preds[i]), int(exits[i]))
    assert sorted(set(assign_exits(conf, spread))) == [0, 1, 2]


def test_a_spec_with_the_readme_factory_runs_end_to_end(user_modules, tmp_path):
    spec = yaml.safe_load(blocks("yaml")[0])
    spec["results_dir"] = str(tmp_path / "results")
    spec["base"]["data"].update({"train_subset": 256, "calib_size": 64, "test_subset": 128})
    spec["base"]["train"].update({"progress": False, "tensorboard": False, "ema": False})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path), "--devices", "cpu", "--workers", "1"]) == 0

    runs = pd.read_csv(tmp_path / "results" / "runs.csv")
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["num_exits"] == 3
    assert row["model.name"] == "tiny_exits:make_model"
    for name in ("low", "mid", "high"):
        assert 0 <= row[f"acc_{name}"] <= 100
    assert row["acc_final"] == row["acc_high"]
    counted = count_costs(dynexit.create_model("tiny_exits:make_model", input_size=28)).gmacs
    assert np.allclose([row["gmacs_low"], row["gmacs_mid"], row["gmacs_high"]], counted)
    assert row["params"] == sum(p.numel() for p in dynexit.create_model("tiny_exits:make_model").parameters())
    folder = next((tmp_path / "results" / "runs").glob("*/checkpoint.pt")).parent
    # The run's test logits are the checkpoint's: the factory and its arguments rebuild the model.
    from dynexit.logits import load_logits
    from dynexit.models.checkpoint import load_model, read

    checkpoint = read(folder / "checkpoint.pt")
    assert checkpoint["model_kind"] == "factory"
    assert checkpoint["model_config"] == {"factory": "tiny_exits:make_model",
                                          "kwargs": {"num_classes": 10, "input_size": 28, "width": 8}}
    model = load_model(folder / "checkpoint.pt", factory="tiny_exits:make_model")  # the caller consents
    assert type(model).__name__ == "TinyExits" and model.exit_names == ("low", "mid", "high")
    test_logits, _ = load_logits(folder / "logits_test.npz")
    accuracy = (test_logits.argmax(-1) == load_logits(folder / "logits_test.npz")[1]).mean(axis=1) * 100
    assert np.allclose(accuracy, [row["acc_low"], row["acc_mid"], row["acc_high"]])
    # The threshold search takes its saved logits and costs like any other run's.
    assert main(["search", "thresholds", "--calib", str(folder / "logits_calib.npz"), "--test",
                 str(folder / "logits_test.npz"), "--costs", str(folder / "costs.csv"), "--budgets",
                 f"{row['gmacs_mid']:.6f}", "--trials", "5", "--out", str(tmp_path / "search.csv")]) == 0
    searched = pd.read_csv(tmp_path / "search.csv")
    assert len(searched) == 1 and 0 <= searched["test_accuracy"].iloc[0] <= 100
    # The report takes it like any other experiment.
    assert main(["report", str(tmp_path / "results"), "--formats", "png", "--no-published"]) == 0
    written = {p.name for p in (tmp_path / "results").rglob("*") if p.is_file()}
    assert any(name.endswith(".png") for name in written), written


def test_a_forward_only_model_needs_given_costs_and_says_what_it_lacks(user_modules, tmp_path):
    model = dynexit.create_model("forward_only:make")
    assert check_multi_exit_model(model) == ("first", "second")
    with pytest.raises(TypeError, match="early_exit needs .*TwoHeads has no init_state and no run_segment"):
        early_exit(model, torch.randn(2, 3, 8, 8), [0.5, 0.0])
    with pytest.raises(TypeError, match="counting per-exit costs needs .*no init_state"):
        count_costs(model, 8)
    base = {"model": {"factory": "forward_only:make", "num_classes": 10}, "data": {"name": "digits"},
            "eval": {"grid": "msdnet"}}
    with pytest.raises(ValueError, match=r"model.costs: TwoHeads has no init_state/run_segment"):
        validate_run_config(merge(RunConfig, base))
    with pytest.raises(ValueError, match=r"model.costs must be 2 positive GMACs"):
        validate_run_config(merge(RunConfig, {**base, "model": {**base["model"], "costs": [0.2, 0.1]}}))
    cfg = merge(RunConfig, {**base, "model": {**base["model"], "costs": [0.001, 0.002]}})
    validate_run_config(cfg)
    assert cfg.model.num_classes == 10 and cfg.model.options is None  # a Dyn-Perceiver field, typed
    with pytest.raises(ValueError, match="eval.grid: the official grid.*the model has 2 exits"):
        validate_run_config(merge(cfg, {"eval": {"grid": "official"}}))
    from dynexit.runs.pipeline import given_costs

    table = given_costs(("first", "second"), cfg.model.costs)
    assert table["gmacs"].tolist() == [0.001, 0.002] and np.allclose(table["segment_gmacs"], [0.001, 0.001])


@pytest.mark.parametrize("name, message", [
    ("os.system", "not of the form 'package.module:function'"),
    ("a:b:c", "not of the form"),
    ("__import__('os'):x", "not of the form"),
    ("dynexit.models:create_model", "a module of your own"),
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("tiny_exits:nothing", "has no function 'nothing'"),
])
def test_bad_factory_names_are_refused(user_modules, name, message):
    with pytest.raises(ValueError, match=re.escape(message) if "(" not in message else message):
        load_factory(name)
    if ":" in name:
        with pytest.raises(ValueError):
            dynexit.create_model(name)


def test_a_factory_that_gives_no_multi_exit_model_is_named(user_modules, tmp_path):
    (user_modules / "plain.py").write_text("from torch import nn\n\ndef make():\n    return nn.Linear(2, 2)\n")
    try:
        with pytest.raises(TypeError, match="Linear has no valid exit_names"):
            dynexit.create_model("plain:make")
    finally:
        sys.modules.pop("plain", None)
    with pytest.raises(TypeError, match="a multi-exit model"):
        check_multi_exit_model(object())


def write_config(tmp_path: Path, model: dict, train: dict | None = None) -> Path:
    path = tmp_path / "run.yaml"
    sections = {"model": model, "data": {"name": "digits"}, "eval": {"grid": "msdnet"}}
    path.write_text(yaml.safe_dump({**sections, **({"train": train} if train else {})}))
    return path


def test_model_sections_of_every_family_are_checked_at_load(user_modules, tmp_path):
    cfg = load_run_config(write_config(tmp_path, {"name": "msdnet_small", "nBlocks": 3}))
    assert cfg.model.options == {"nBlocks": 3}
    assert dynexit.models.list_models()  # the presets of all families
    cfg = load_run_config(write_config(tmp_path, {"name": "branchy_resnet_tiny", "exits_after": [2, 3]}))
    assert exit_loss_weights(("stage2", "stage3", "final"), cfg.train.loss_weights) == dict.fromkeys(
        ("stage2", "stage3", "final"), 1.0)
    for model, message in [({"name": "msdnet_small", "x2z": False}, "model.x2z: not a setting of msdnet_small"),
                           ({"name": "tiny_perceiver_t16", "nBlocks": 3}, "model.nBlocks: not a setting of tiny"),
                           ({"name": "no_such_preset"}, "model.name: unknown preset 'no_such_preset'"),
                           ({"factory": "no_such_module_xyz:f"}, "model.factory: .*cannot import")]:
        with pytest.raises(ValueError, match=f"run.yaml: {message}"):
            load_run_config(write_config(tmp_path, model))
    with pytest.raises(ValueError, match="train.loss_weights: 'early3' is not an exit"):
        load_run_config(write_config(tmp_path, {"factory": "tiny_exits:make_model"},
                                     {"loss_weights": {"early3": 1.0, "low": 1.0, "mid": 1.0, "high": 1.0}}))
    cfg = load_run_config(write_config(tmp_path, {"factory": "tiny_exits:make_model", "width": 4},
                                       {"loss_weights": {"low": 0.5, "mid": 0.5, "high": 1.0}}))
    assert cfg.model.options == {"width": 4}
    # --set reaches a factory's arguments too
    cfg = load_run_config(write_config(tmp_path, {"factory": "tiny_exits:make_model"}), ["model.width=2"])
    assert cfg.model.options == {"width": 2}


def test_the_new_model_keys_stay_out_of_a_perceiver_configs_identity(tmp_path):
    from dynexit.config import save_yaml

    tree = to_container(RunConfig())
    assert not {"factory", "costs", "options"} & set(tree["model"])
    save_yaml(RunConfig(), tmp_path / "perceiver.yaml")
    assert "options" not in (tmp_path / "perceiver.yaml").read_text()
    cfg = merge(RunConfig, {"model": {"name": "msdnet_small", "nBlocks": 3}, "eval": {"grid": "msdnet"}})
    assert to_container(cfg)["model"]["options"] == {"nBlocks": 3}
    save_yaml(cfg, tmp_path / "msdnet.yaml")  # a run folder's config.yaml loads back to the same config
    assert to_container(load_run_config(tmp_path / "msdnet.yaml")) == to_container(cfg)


def test_default_loss_weights_are_one_per_exit_for_other_models():
    perceiver = ("early3", "att", "cnn", "merge")
    default = RunConfig().train.loss_weights
    assert exit_loss_weights(perceiver, default) == default
    assert exit_loss_weights(("a", "b"), default) == {"a": 1.0, "b": 1.0}
    assert exit_loss_weights(("a", "b"), {"a": 0.3, "b": 1.0}) == {"a": 0.3, "b": 1.0}


def test_any_module_with_segments_works_without_the_base_class():
    """Nothing checks the class: a model defined here, not through dynexit's base class."""
    namespace: dict = {}
    exec(textwrap.dedent(blocks("python")[0]), namespace)
    model = namespace["make_model"](num_classes=4, input_size=16).eval()
    assert not isinstance(model, dynexit.models.MultiExitModel) and isinstance(model, nn.Module)
    assert isinstance(model, dynexit.models.SegmentedMultiExitModule)
    costs = count_costs(model)
    assert costs.input_size == 16 and len(costs.gmacs) == 3


def test_bench_times_the_readme_model_and_refuses_a_forward_only_one(user_modules, capsys):
    assert main(["bench", "tiny_exits:make_model", "--input-size", "16", "--repeats", "1", "--warmup", "0",
                 "--images", "8", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "tiny_exits:make_model at 16x16" in out
    for name in ("low", "mid", "high"):
        assert re.search(rf"^\s+\d\s+{name}\s", out, flags=re.M)
    assert main(["bench", "forward_only:make", "--repeats", "1", "--warmup", "0"]) != 0
    assert "dynexit bench needs a model that runs exit by exit, but TwoHeads has no init_state" in \
        capsys.readouterr().err


def test_a_spec_with_a_bad_model_section_names_the_variant_and_key_and_writes_nothing(user_modules, tmp_path):
    from dynexit.runs.spec import load_spec

    spec = tmp_path / "bad.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: bad
        results_dir: {tmp_path / 'results'}
        base:
          model: {{name: tiny_perceiver_t16, num_classes: 10}}
          eval: {{grid: msdnet}}
        variants:
          good: {{model.factory: "tiny_exits:make_model"}}
          wrong: {{model.name: msdnet_small, model.growth: 3}}
        """))
    with pytest.raises(ValueError, match="wrong.*model.growth: not a setting of msdnet_small"):
        load_spec(spec)
    assert not (tmp_path / "results").exists()
