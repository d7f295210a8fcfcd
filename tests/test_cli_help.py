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
    try:
        code = main(_argv(example, workdir))
    finally:  # each example starts without the studies of the others (a study keeps its settings)
        shutil.rmtree(workdir / "results" / "quickstart" / "search", ignore_errors=True)
        (workdir / "shared.db").unlink(missing_ok=True)
    assert code == 0, f"{example}\n{capsys.readouterr().err}"
