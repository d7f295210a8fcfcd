"""The command line's help: it answers without loading torch (or pandas, matplotlib, optuna, ...), --set
means one thing everywhere, and every example of every --help runs.

Examples run in-process in a scratch folder that holds stand-ins for the files they name (logits, costs,
official checkpoints, an experiment's results, the specs of experiments/). Where an example would train
for minutes or time a model many times, the test appends options that keep it short; they are listed in
SHORTER and change nothing else about the command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynexit.cli import build_parser, main
from dynexit.cli.options import SET_RULE

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "pandas", "matplotlib", "optuna", "fvcore", "sklearn", "scipy")
EXITS = ("early3", "att", "cnn", "merge")
SMALL_DATA = ["--set", "data.name=digits", "--set", "data.fallback=null", "--set", "data.calib_size=100",
              "--set", "data.train_subset=200", "--set", "data.test_subset=100"]
# Appended to examples of these commands so that they take seconds (later options win).
SHORTER = {
    ("run",): ["--dry-run"],
    ("train",): ["--set", "train.epochs=1", "--set", "train.warmup_epochs=0", "--set", "train.eval_every=1",
                 *SMALL_DATA],
    ("bench",): ["--repeats", "1", "--warmup", "0", "--images", "2", "--threads", "1"],
    ("search", "thresholds"): ["--trials", "3"],
    ("search", "loss-weights"): ["--trials", "1", "--device", "cpu", "--set", "train.epochs=1", *SMALL_DATA],
}


def parsers(parser: argparse.ArgumentParser | None = None, prefix: tuple[str, ...] = ()):
    """Every (sub)command's parser, with its command words."""
    parser = parser or build_parser()
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, prefix + (name,))


def examples_of(epilog: str) -> list[str]:
    """The example commands of an epilog: the lines after 'examples:' up to the first blank line, with
    backslash continuations joined."""
    out, inside, pending = [], False, ""
    for line in epilog.splitlines():
        if line.strip() in ("examples:", "example:"):
            inside = True
            continue
        if inside and not line.strip():
            break
        if inside:
            pending += line.strip().removesuffix("\\").strip() + " "
            if not line.rstrip().endswith("\\"):
                out.append(pending.strip())
                pending = ""
    return out


EXAMPLES = list(dict.fromkeys(e for _, p in parsers() for e in examples_of(p.epilog or "")))


def test_every_command_has_examples_and_they_call_dynexit():
    for words, parser in parsers():
        found = examples_of(parser.epilog or "")
        assert found, f"'dynexit {' '.join(words)}' --help has no example"
        for example in found:
            assert example.startswith(f"dynexit {' '.join(words)}".strip()) or not words, example
    assert len(EXAMPLES) >= 20


def test_set_means_the_same_in_every_command(capsys):
    for words, parser in parsers():
        if any(a.dest == "set" for a in parser._actions):
            assert SET_RULE in (parser.epilog or ""), f"dynexit {' '.join(words)}: --help must state the --set rule"
    # A plain model key (like the old help example '--set with_isc=false') is refused with the dotted spelling.
    assert main(["costs", "tiny_perceiver_t16", "--set", "x2z=false"]) == 1
    assert "write model.x2z=" in capsys.readouterr().err


def test_help_loads_neither_torch_nor_the_heavy_libraries():
    code = f"""
import contextlib, io, json, sys
from dynexit.cli import main
commands = {json.dumps([list(w) for w, _ in parsers()])}
for words in commands:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(words + ["--help"])
        except SystemExit:
            pass
print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == []
    # python -m dynexit --help: the package's own import loads none of them either.
    timing = subprocess.run([sys.executable, "-X", "importtime", "-m", "dynexit", "--help"], capture_output=True,
                            text=True, cwd=ROOT, check=True)
    imported = {line.split("|")[-1].strip() for line in timing.stderr.splitlines() if "|" in line}
    assert "usage: dynexit" in timing.stdout
    assert not imported & set(HEAVY)


# ----------------------------------------------------------------------------------------- examples

def _save_logits(path: Path, rng: np.random.Generator, samples: int = 240, classes: int = 10) -> None:
    from dynexit.logits import save_logits

    targets = rng.integers(0, classes, samples)
    onehot = np.eye(classes, dtype=np.float32)[targets]
    logits = np.stack([rng.normal(size=onehot.shape).astype(np.float32) + s * onehot for s in (1.0, 2.0, 2.5, 3.0)])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_logits(path, logits, targets)


def _official_checkpoints(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from official_layout import ablated_keys, deterministic_weights, load_fixture

    reg = load_fixture("reg800m_perceiver_t128")["keys"]
    args = argparse.Namespace(model="reg800m_perceiver_t128")
    torch.save({"model": deterministic_weights(reg), "args": args}, folder / "reg800m_t128.pth")
    resnet = load_fixture("resnet50_0375_perceiver_t128")["keys"]
    torch.save({"model": deterministic_weights(ablated_keys(resnet, isc=False))}, folder / "ckpt.pth")


def _msdnet_checkpoint(root: Path, words: list[str]) -> None:
    """A checkpoint in the reference MSDNet layout for a convert-msdnet example (its --model and --set)."""
    import yaml

    import dynexit

    sets = [value for flag, value in zip(words, words[1:]) if flag == "--set"]
    overrides = {key.removeprefix("model."): yaml.safe_load(value) for key, value in (s.split("=", 1) for s in sets)}
    model = dynexit.create_model(words[words.index("--model") + 1], **overrides)
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 1, "arch": "msdnet", "state_dict": state, "best_prec1": 0.0}, root / words[2])


# The factory of the `costs mypkg.models:build --op-handle aten::cumsum=zero` example: two exits, each segment
# with a cumsum, an op fvcore has no handle for.
MYPKG_MODELS = """import torch
from typing import NamedTuple
from torch import nn


class State(NamedTuple):
    x: torch.Tensor
    logits: tuple = ()


class CumsumExits(nn.Module):
    exit_names = ("a", "b")

    def __init__(self, num_classes=10, input_size=16):
        super().__init__()
        self.input_size = input_size
        self.convs = nn.ModuleList(nn.Conv2d(3 if k == 0 else 4, 4, 3, padding=1) for k in range(2))
        self.heads = nn.ModuleList(nn.Linear(4, num_classes) for _ in range(2))

    def init_state(self, x):
        return State(x)

    def run_segment(self, k, s):
        x = torch.relu(self.convs[k](s.x)).cumsum(-1)
        return State(x, (*s.logits, self.heads[k](x.mean((2, 3)))))

    def forward(self, x):
        s = self.init_state(x)
        for k in range(2):
            s = self.run_segment(k, s)
        return list(s.logits)


def build(num_classes=10, input_size=16):
    return CumsumExits(num_classes, input_size)
"""


def _old_run_folders(root: Path) -> None:
    """For the migrate-ids examples: the committed Fashion-MNIST results with their run folder under a name
    that is not its current id (results/fashion_mnist), and the same without any record of the run's threads
    (results/old_copy, read through my_spec.yaml)."""
    source = ROOT / "results" / "fashion_mnist"
    for name, keep_threads in (("fashion_mnist", True), ("old_copy", False)):
        target = root / "results" / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint.pt", "tb", ".lock"))
        (folder,) = [p for p in (target / "runs").iterdir() if p.is_dir()]
        folder = folder.rename(folder.with_name("0000000000"))
        if not keep_threads:
            status = json.loads((folder / "status.json").read_text())
            status.pop("threads", None)
            (folder / "status.json").write_text(json.dumps(status))
            config = (folder / "config.yaml").read_text()
            (folder / "config.yaml").write_text("".join(line for line in config.splitlines(keepends=True)
                                                        if not line.strip().startswith("threads:")))
    shutil.copy(root / "experiments" / "fashion_mnist.yaml", root / "my_spec.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, one_torch_thread) -> Path:
    """A scratch folder with the specs and stand-ins for every file an example reads."""
    import pandas as pd
    from test_analysis import write_architectures, write_synthetic_results

    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(ROOT / "experiments", root / "experiments")
    rng = np.random.default_rng(0)
    for example in EXAMPLES:
        words = shlex.split(example, comments=True)
        for flag, value in zip(words, words[1:]):
            if flag in ("--calib", "--test"):
                _save_logits(root / value, rng)
            elif flag == "--costs" and value.endswith(".csv"):
                (root / value).parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame({"exit": EXITS, "gmacs": [0.46, 1.06, 1.23, 1.30]}).to_csv(root / value, index=False)
            elif flag in ("--policy", "--curve"):
                _policy_file(root / value, words[2], flag)
        if words[1] == "convert-msdnet":
            _msdnet_checkpoint(root, words)
    _official_checkpoints(root)
    _old_run_folders(root)
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "models.py").write_text(MYPKG_MODELS)
    results = write_synthetic_results(root / "results" / "quickstart", seeds=(0,), samples=60)
    write_architectures(results)  # for 'dynexit bench RESULTS_DIR'
    shutil.copy(root / "experiments" / "quickstart.yaml", results / "experiment.yaml")  # as 'dynexit run' keeps it
    shutil.copytree(results, root / "runs" / "quickstart")  # a reproduction, for the compare examples
    return root


def _policy_file(path: Path, model_name: str, flag: str) -> None:
    """An exit policy (--policy) or a one-point curve (--curve) for the exits of ``model_name``."""
    import pandas as pd

    from dynexit.models import create_model
    from dynexit.policies import ALWAYS, ExitPolicy

    names = create_model(model_name).exit_names
    thresholds = [0.5] * (len(names) - 1) + [float(ALWAYS)]
    if flag == "--policy":
        ExitPolicy(tuple(names), "max_softmax", tuple(thresholds)).save(path)
    else:
        row = {"point": 0, **{f"threshold_{n}": t for n, t in zip(names, thresholds)}, "criterion": "max_softmax",
               "calib_accuracy": 50.0, "calib_expected_cost": 0.01}
        pd.DataFrame([row]).to_csv(path, index=False)


def _argv(example: str, root: Path) -> list[str]:
    words = shlex.split(example, comments=True)[1:]
    for command, extra in SHORTER.items():
        if tuple(words[: len(command)]) == command:
            # a key the example sets itself keeps the shorter value (a key given twice is refused)
            shorter = {extra[i + 1].partition("=")[0] for i, w in enumerate(extra) if w == "--set"}
            kept = []
            for word in words:
                if kept and kept[-1] == "--set" and word.partition("=")[0] in shorter:
                    kept.pop()
                    continue
                kept.append(word)
            words = kept + extra
    # a database server is not at hand: the same study in a SQLite file
    return [f"sqlite:///{root / 'shared.db'}" if w.startswith("postgresql://") else w for w in words]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_help_example_runs(example, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))  # the examples' own factory (mypkg)
    try:
        code = main(_argv(example, workdir))
    finally:  # each example starts without the studies of the others (a study keeps its settings)
        shutil.rmtree(workdir / "results" / "quickstart" / "search", ignore_errors=True)
        (workdir / "shared.db").unlink(missing_ok=True)
    assert code == 0, f"{example}\n{capsys.readouterr().err}"


# ------------------------------------------------------------------------- one name per concept

VISIBLE_OLD_SPELLINGS = ("--csv", "--results-dir", "--study-dir", "--device")


def visible_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def test_outputs_devices_and_grids_are_spelled_one_way_in_every_command():
    for words, parser in parsers():
        shown = visible_options(parser)
        old = shown & set(VISIBLE_OLD_SPELLINGS)
        assert not old, f"dynexit {' '.join(words)} shows {old}"
        for action in parser._actions:
            if action.dest in ("out", "device", "devices") and action.help != argparse.SUPPRESS:
                assert action.option_strings == ["--out" if action.dest == "out" else "--devices"], (words, action)
        text = parser.format_help()
        assert "'official'" not in text, f"dynexit {' '.join(words)}: a grid is named by --grid, not --budgets"


@pytest.mark.parametrize("argv,dest,value", [
    (["costs", "tiny_perceiver_t16", "--csv", "c.csv"], "out", "c.csv"),
    (["run", "spec.yaml", "--results-dir", "r"], "out", "r"),
    (["run", "spec.yaml", "--device", "cpu"], "devices", "cpu"),
    (["migrate-ids", "spec.yaml", "--results-dir", "r"], "out", "r"),
    (["search", "loss-weights", "spec.yaml", "--trials", "1", "--study-dir", "s"], "out", Path("s")),
    (["train", "c.yaml", "--device", "cpu"], "device", "cpu"),
    (["bench", "tiny_perceiver_t16", "--device", "cpu"], "device", "cpu"),
])
def test_old_spellings_are_hidden_aliases_of_the_new_ones(argv, dest, value):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    new = {"--csv": "--out", "--results-dir": "--out", "--study-dir": "--out", "--device": "--devices"}
    renamed = [new.get(word, word) for word in argv]
    assert getattr(build_parser().parse_args(renamed), dest) == value


def test_a_one_device_command_refuses_a_list(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "c.yaml", "--devices", "cuda:0,cuda:1"])
    err = capsys.readouterr().err
    assert "usage: dynexit train" in err and "one device" in err


def test_abbreviations_are_not_silently_taken(capsys):
    with pytest.raises(SystemExit):
        main(["run", "spec.yaml", "--dev", "cpu"])
    assert "usage: dynexit run" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_go_before_or_after_the_command(where, capsys):
    options = ["--debug", "-v"]
    argv = [*options, "costs", "tiny_perceiver_t16"] if where == "before" else ["costs", "tiny_perceiver_t16", *options]
    args = build_parser().parse_args(argv)
    assert args.debug is True and args.verbose is True
    plain = build_parser().parse_args(["costs", "tiny_perceiver_t16"])
    assert plain.debug is False and plain.verbose is False
    # --debug after the command shows the traceback: the error propagates instead of one line
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        main(["costs", "no_such_model", "--debug"])
    assert main(["costs", "no_such_model"]) == 1
    assert capsys.readouterr().err.startswith("dynexit costs: error: unknown model 'no_such_model'")


def test_a_misspelt_command_or_option_gets_the_closest_and_its_command_usage(capsys):
    with pytest.raises(SystemExit):
        main(["cost", "tiny_perceiver_t16"])
    assert "did you mean 'costs'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "results/compare", "--budgts", "0.01"])
    err = capsys.readouterr().err
    assert err.startswith("usage: dynexit report") and "did you mean '--budgets'?" in err
    with pytest.raises(SystemExit):
        main(["search", "thresholds", "--calib", "c", "--test", "t", "--costs", "1,2", "--out", "o", "--paretto"])
    err = capsys.readouterr().err
    assert err.startswith("usage: dynexit search thresholds") and "did you mean '--pareto'?" in err
    with pytest.raises(SystemExit):
        main(["search", "threshold"])
    assert "did you mean 'thresholds'?" in capsys.readouterr().err


def test_every_command_that_takes_a_model_names_factories():
    for words, parser in parsers():
        if words and words[0] in ("costs", "bench", "train", "run") or words == ("search", "loss-weights"):
            assert "package.module:function" in parser.format_help(), f"dynexit {' '.join(words)} --help"


def test_status_takes_set_like_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["status", "experiments/quickstart.yaml", "--set", "train.epochs=30"]) == 0
    longer = capsys.readouterr().out
    assert main(["status", "experiments/quickstart.yaml"]) == 0
    plain = capsys.readouterr().out
    # The committed runs are done; with 30 epochs they are other runs (a run's id covers train), none done yet.
    assert plain.splitlines()[-1] == "done: 14" and longer.splitlines()[-1] == "done: 14  pending: 14"
    assert "14 other run folders there" in longer
    assert main(["status", "experiments/quickstart.yaml", "--set", "train.epochs=-1"]) == 1
    assert "train.epochs" in capsys.readouterr().err
