"""No file runs code: every loader of the package, handed a file whose unpickling would create a marker
file, refuses it with an error naming the file and what it holds, and the marker never appears. New
loaders join ``LOADERS``; ``test_every_load_call_in_the_package_is_safe`` catches loaders that bypass the
safe ones."""
import argparse
import ast
import builtins
import io
import pickle
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dynexit
import dynexit.models.checkpoint
from dynexit.cli import main as cli_main
from dynexit.config import DataConfig, RunConfig, merge
from dynexit.data import build_datasets
from dynexit.models.official import open_checkpoint
from dynexit.runs.aggregate import write_experiment_files
from dynexit.runs.folders import FAILED, RUNNING, read_status, run_dir, write_status
from dynexit.runs.spec import load_spec
from dynexit.training import train
from dynexit.utils import UnsafeFileError, load_torch_file

PACKAGE = Path(dynexit.__file__).parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py

TINY_BASE = {"model": {"name": "tiny_perceiver_t16", "input_size": 16},
             "data": {"name": "digits", "image_size": 16, "train_subset": 64, "test_subset": 32, "calib_size": 32},
             "train": {"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False}}


class CreatesMarker:
    """Unpickling this object runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def payload(kind: str, marker: Path):
    if kind == "code":  # a bare attack: a dict that looks like a checkpoint
        return {"model": {"latent": torch.zeros(2)}, "epoch": 1, "evil": CreatesMarker(marker)}
    if kind == "official_plus_code":  # an official checkpoint (weights and args) with one extra global
        args = argparse.Namespace(model="tiny_perceiver_t16", nb_classes=10, input_size=32)
        return {"model": {"latent": torch.zeros(16, 128)}, "args": args, "evil": CreatesMarker(marker)}
    raise KeyError(kind)


def write_torch_payload(path: Path, kind: str, marker: Path) -> Path:
    torch.save(payload(kind, marker), path)
    return path


def write_cifar_payload(path: Path, kind: str, marker: Path) -> Path:
    """A CIFAR batch with the code-running object (``kind`` aside: CIFAR files have no official variant)."""
    batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "evil": CreatesMarker(marker)}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path


# ------------------------------------------------------------------------------------------ loaders
# Each loader gets a scratch folder and ``put(path)``, which writes the bad file where the loader reads it;
# it must raise an exception whose message names that file. CLI loaders turn their one-line error and
# exit status into that exception.

def tiny_spec(folder: Path) -> Path:
    spec = {"name": "bad_resume", "results_dir": str(folder / "results"), "base": TINY_BASE}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load_via_training_resume(tmp: Path, put, capsys):
    put(tmp / "run" / "checkpoint.pt")
    train(merge(RunConfig, TINY_BASE), tmp / "run")


def load_via_train_cli(tmp: Path, put, capsys):
    put(tmp / "run" / "checkpoint.pt")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(TINY_BASE))
    assert cli_main(["train", str(config), "--out", str(tmp / "run")]) == 1
    raise ValueError(capsys.readouterr().err)


def load_via_convert_msdnet_cli(tmp: Path, put, capsys):
    path, out = put(tmp / "msdnet.pth.tar"), tmp / "converted.pt"
    status = cli_main(["convert-msdnet", str(path), str(out), "--model", "msdnet_small"])
    err = capsys.readouterr().err
    assert status == 1 and not out.exists()
    raise ValueError(err)


def load_via_convert_cli(tmp: Path, put, capsys):
    path, out = put(tmp / "official.pth"), tmp / "converted.pt"
    status = cli_main(["convert-official", str(path), str(out), "--model", "tiny_perceiver_t16"])
    err = capsys.readouterr().err
    assert status == 1 and not out.exists()
    assert err.count("\n") == 1, err  # one line
    raise ValueError(err)


def load_via_runner_resume(tmp: Path, put, capsys):
    spec = tiny_spec(tmp)
    experiment = load_spec(spec)
    folder = run_dir(experiment, experiment.runs[0])
    write_experiment_files(experiment)  # as the runner that was interrupted left its results folder
    put(folder / "checkpoint.pt")
    write_status(folder, RUNNING)  # an interrupted run: the runner resumes it from its checkpoint
    assert cli_main(["run", str(spec), "--devices", "cpu", "--workers", "1"]) == 1
    status = read_status(folder)
    assert status["state"] == FAILED
    raise ValueError(status["error"])


def load_cifar(tmp: Path, put, capsys):
    put(tmp / "cifar" / "cifar-10-batches-py" / "test_batch")  # found first
    put(tmp / "cifar" / "cifar-10-batches-py" / "data_batch_1")  # read first
    build_datasets(DataConfig(name="cifar10", root=str(tmp / "cifar")))


TORCH_LOADERS = {
    "load_torch_file": lambda tmp, put, capsys: load_torch_file(put(tmp / "file.pt"), "file"),
    "open_checkpoint": lambda tmp, put, capsys: open_checkpoint(put(tmp / "official.pth")),
    "load_official": lambda tmp, put, capsys: dynexit.load_official(dynexit.create_model("tiny_perceiver_t16"),
                                                                    put(tmp / "official.pth")),
    "checkpoint.read": lambda tmp, put, capsys: dynexit.models.checkpoint.read(put(tmp / "model.pt")),
    "checkpoint.load_model": lambda tmp, put, capsys: dynexit.models.checkpoint.load_model(put(tmp / "model.pt")),
    "load_backbone_weights": lambda tmp, put, capsys: dynexit.load_backbone_weights(
        dynexit.create_model("tiny_perceiver_t16").backbone, put(tmp / "resnet.pth")),
    "load_msdnet": lambda tmp, put, capsys: dynexit.load_msdnet(dynexit.create_model("msdnet_small"),
                                                                put(tmp / "msdnet.pth.tar")),
    "dynexit convert-msdnet": load_via_convert_msdnet_cli,
    "train resume": load_via_training_resume,
    "dynexit train (resume)": load_via_train_cli,
    "dynexit convert-official": load_via_convert_cli,
    "dynexit run (resume)": load_via_runner_resume,
}
LOADERS = [(name, write_torch_payload, load) for name, load in TORCH_LOADERS.items()]
LOADERS.append(("CIFAR batch", write_cifar_payload, load_cifar))


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path):
    """The attack is real: an unsafe load of each payload creates the marker."""
    for kind in ("code", "official_plus_code"):
        marker = tmp_path / f"{kind}.marker"
        path = write_torch_payload(tmp_path / f"{kind}.pt", kind, marker)
        torch.load(path, weights_only=False)  # deliberately unsafe, on our own payload
        assert marker.exists()
    marker = tmp_path / "cifar.marker"
    pickle.loads(write_cifar_payload(tmp_path / "batch", "code", marker).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", ["code", "official_plus_code"])
@pytest.mark.parametrize("name, write, load", LOADERS, ids=[entry[0] for entry in LOADERS])
def test_no_loader_runs_code_from_a_file(tmp_path, capsys, name, write, load, kind):
    marker, written = tmp_path / "marker", []

    def put(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(write(path, kind, marker))
        return path

    with pytest.raises(Exception) as err:
        load(tmp_path, put, capsys)
    message = str(err.value)
    assert not marker.exists(), f"{name} ran code from {written}"
    assert isinstance(err.value, ValueError), message
    assert str(written[-1]) in message, message
    assert re.search(r"(builtins|__builtin__)\.exec", message), message  # pickle protocol 2 says __builtin__
    if kind == "official_plus_code" and name in ("open_checkpoint", "load_official", "dynexit convert-official"):
        assert "argparse" not in message  # official files may hold their training arguments: not refused


def test_refusal_names_every_global_the_file_holds(tmp_path):
    path = write_torch_payload(tmp_path / "evil.pth", "official_plus_code", tmp_path / "marker")
    with pytest.raises(UnsafeFileError) as err:
        load_torch_file(path, "dynexit checkpoint")
    assert set(err.value.globals) == {"argparse.Namespace", "builtins.exec"}
    assert str(path) in str(err.value) and "could run code" in str(err.value)
    # The official loader allows the namespace, and only for that load.
    with pytest.raises(UnsafeFileError) as err:
        open_checkpoint(path)
    assert err.value.globals == ["builtins.exec"]
    assert "argparse.Namespace" not in str(torch.serialization.get_safe_globals())


def test_official_checkpoints_load_with_their_training_arguments(tmp_path):
    args = argparse.Namespace(model="tiny_perceiver_t16", depth_factor=["1", "1", "1", "2"], lr=1e-3)
    path = tmp_path / "official.pth"
    torch.save({"model": {"latent": torch.ones(3)}, "args": args, "epoch": 4, "scaler": {"scale": 2.0}}, path)
    checkpoint = open_checkpoint(path)
    assert vars(checkpoint["args"]) == vars(args) and checkpoint["epoch"] == 4


def test_training_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    result = train(merge(RunConfig, TINY_BASE), tmp_path / "run")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(result.checkpoint) == []
    checkpoint = torch.load(result.checkpoint, weights_only=True)  # no allow-list at all
    python, numpy = checkpoint["rng"][0]["python"], checkpoint["rng"][0]["numpy"]
    assert isinstance(python, list) and isinstance(python[1], list) and len(python[1]) == 625
    assert isinstance(numpy["key"], list) and len(numpy["key"]) == 624 and numpy["kind"] == "MT19937"


def test_random_states_round_trip_exactly():
    import random

    from dynexit.training.state import rng_state, set_rng_state

    np.random.seed(3), random.seed(3), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    generator = torch.Generator().manual_seed(5)
    buffer = io.BytesIO()
    torch.save(rng_state(generator), buffer)
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2),
                torch.rand(2, generator=generator))
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True), generator)
    again = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2),
             torch.rand(2, generator=generator))
    assert expected[:3] == again[:3]
    assert torch.equal(expected[3], again[3]) and torch.equal(expected[4], again[4])


def test_a_checkpoint_of_an_older_version_says_to_start_the_run_over(tmp_path):
    """Older versions pickled numpy's random state: refused (not loaded unsafely), with what to delete."""
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "checkpoint.pt"
    model = dynexit.create_model("tiny_perceiver_t16")
    rng = {"python": (3, tuple(range(625)), None), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    dynexit.models.checkpoint.save_model(path, model, format="dynexit-train-1", rng=[rng], epoch=1)
    for load in (dynexit.models.checkpoint.load_model, dynexit.models.checkpoint.read):
        with pytest.raises(dynexit.models.checkpoint.OutdatedCheckpointError) as err:
            load(path)
        message = str(err.value)
        assert "older dynexit version" in message and f"delete {path}" in message and str(folder) in message
    with pytest.raises(ValueError, match="older dynexit version") as err:
        train(merge(RunConfig, TINY_BASE), folder)
    assert f"delete {path}" in str(err.value)
    assert path.is_file()  # refused, not removed


# --------------------------------------------------------------------------------------------- CIFAR

def write_cifar10(root: Path, protocol: int) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": "batch", "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "labels": [0, 1, 2, 9], "filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 4, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    folder = write_cifar10(tmp_path, protocol)
    splits = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), calib_size=2))
    assert splits.classes[:2] == ["class0", "class1"]
    assert len(splits.train) + len(splits.calib) == 20 and len(splits.test) == 4
    expected = pickle.loads((folder / "test_batch").read_bytes())["data"][1].reshape(3, 32, 32)
    assert torch.equal(splits.test.images[1], torch.from_numpy(expected))


def test_a_cifar_file_with_another_global_is_refused_naming_it(tmp_path):
    folder = write_cifar10(tmp_path, 2)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": __import__("collections").Counter()}))
    with pytest.raises(ValueError) as err:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), calib_size=2))
    assert str(folder / "batches.meta") in str(err.value) and "collections.Counter" in str(err.value)


# ------------------------------------------------------------------------------ every load call is safe

UNSAFE_ALWAYS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "torch.jit.load", "pd.read_pickle",
                 "pandas.read_pickle", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "dill.load",
                 "joblib.load", "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader",
                 "torch.serialization.add_safe_globals"}  # allow-lists are scoped to one load, never global


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, reason) of every load that is not one of the safe forms."""
    problems, safe_calls = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name == "torch.load":
            flag = keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append((node.lineno, "torch.load without weights_only=True"))
            safe_calls.add(id(node.func))
        elif name in ("np.load", "numpy.load"):
            flag = keyword(node, "allow_pickle")
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append((node.lineno, "np.load without allow_pickle=False"))
            safe_calls.add(id(node.func))
        elif name == "yaml.load":
            loader = dotted(keyword(node, "Loader")) if keyword(node, "Loader") is not None else ""
            if not loader.endswith(("UniqueKeyLoader", "SafeLoader")):
                problems.append((node.lineno, f"yaml.load with Loader={loader or 'default'}"))
            safe_calls.add(id(node.func))
    for node in ast.walk(tree):  # a subclass that restricts what it builds is the one safe pickle reader
        if isinstance(node, ast.ClassDef) and any(
                isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body):
            safe_calls.update(id(base) for base in node.bases if dotted(base) == "pickle.Unpickler")
    for node in ast.walk(tree):
        name = dotted(node) if isinstance(node, (ast.Attribute, ast.Name)) else ""
        if name in ("torch.load", "np.load", "numpy.load", "yaml.load") and id(node) not in safe_calls:
            problems.append((node.lineno, f"{name} used other than as a checked call"))
        elif name in UNSAFE_ALWAYS and id(node) not in safe_calls:
            problems.append((node.lineno, name))
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch", "numpy", "yaml", "dill"):
            loaders = [a.name for a in node.names if "load" in a.name.lower() or a.name == "Unpickler"]
            if loaders:
                problems.append((node.lineno, f"from {node.module} import {', '.join(loaders)}"))
    return problems


def test_every_load_call_in_the_package_is_safe():
    """The package, and the project's scripts beside it (analysis, benchmarks, scripts)."""
    root, problems = PACKAGE.parent, []
    sources = [p for folder in (PACKAGE, root / "analysis", root / "benchmarks", root / "scripts")
               for p in sorted(folder.rglob("*.py"))]
    assert len(sources) > 40
    for path in sources:
        rel = path.relative_to(root).as_posix()
        problems += [f"{rel}:{line}: {reason}" for line, reason in unsafe_uses(ast.parse(path.read_text(), str(path)))]
    assert not problems, "unsafe loading:\n" + "\n".join(problems)
    # The checker itself catches each unsafe form.
    bad = textwrap.dedent("""
        import pickle, torch, numpy as np, yaml
        torch.load(p)
        torch.load(p, weights_only=False)
        np.load(p)
        pickle.load(f)
        yaml.load(s, Loader=yaml.Loader)
        loader = torch.load
        from pickle import loads
        class Open(pickle.Unpickler): pass
    """)
    assert {line for line, _ in unsafe_uses(ast.parse(bad))} == set(range(3, 11))


def test_the_cifar_unpickler_allows_only_array_reconstruction():
    from dynexit.data.datasets import _CifarUnpickler

    allowed = {f"{module}.{name}" for module, name in _CifarUnpickler.ALLOWED}
    assert allowed == {"numpy.ndarray", "numpy.dtype", "_codecs.encode",
                       "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                       "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"}
