"""The README and the documentation's code runs as written.

Every ```python block of a document runs, in order, in one namespace per document, in a scratch folder of its
own. Blocks that need ImageNet are skipped by name; files a block names (``*.pth``) are made there first by
``STAND_INS`` (same layout as the real files, deterministic or random weights). A block whose first line is a
docstring naming a file (``\"\"\"tiny_exits.py: ...``) is also written to that file, importable from then on.
Every ``dynexit ...`` line of a ```bash block parses with the command line's parser (so a renamed command or
option cannot linger in the documentation). tests/test_docs.py runs the pages of docs/ with these helpers.
"""
import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from official_layout import deterministic_weights, load_fixture

import dynexit

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def blocks(path: Path, language: str = "python") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def needs_imagenet(code: str) -> bool:
    return "imagenet" in code.lower()


def official_reg800m(path: Path) -> None:
    keys = load_fixture("reg800m_perceiver_t128")["keys"]
    args = argparse.Namespace(model="reg800m_perceiver_t128", nb_classes=1000, input_size=224)
    torch.save({"model": deterministic_weights(keys), "args": args, "epoch": 0}, path)


def torchvision_regnet_y_800mf(path: Path) -> None:
    import torchvision

    torch.save(torchvision.models.regnet_y_800mf(weights=None).state_dict(), path)


def reference_msdnet_cifar_anytime(path: Path) -> None:
    state = dynexit.create_model("msdnet_cifar_anytime").state_dict()
    torch.save({"epoch": 1, "arch": "msdnet", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


STAND_INS = {"reg800m_perceiver_t128.pth": official_reg800m, "regnet_y_800mf.pth": torchvision_regnet_y_800mf,
             "msdnet_cifar_anytime.pth.tar": reference_msdnet_cifar_anytime}


def run_python_blocks(path: Path, folder: Path, monkeypatch) -> dict:
    """Runs the python blocks of ``path`` in order in ``folder``; their namespace."""
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    namespace: dict = {"__name__": f"__doc_{path.stem}__"}
    for index, code in enumerate(c for c in blocks(path) if not needs_imagenet(c)):
        for name in sorted(set(re.findall(r"\"([\w.-]+\.pth(?:\.tar)?)\"", code))):
            assert name in STAND_INS, f"{path.name} block {index} reads {name}: add a stand-in to STAND_INS"
            STAND_INS[name](folder / name)
        module = re.match(r'"""([\w]+)\.py:', code)
        if module:
            (folder / f"{module.group(1)}.py").write_text(code)
            sys.modules.pop(module.group(1), None)
        exec(compile(code, f"{path.name} python block {index}", "exec"), namespace)
    return namespace


def dynexit_lines(path: Path) -> list[str]:
    """The ``dynexit ...`` commands of the bash blocks of ``path`` (comments dropped, continuations joined);
    lines showing alternatives (``[--dry-run]``, ``<run id>``) are left out."""
    found = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for command in line.split("&&"):
                command = command.strip()
                if command.startswith("dynexit ") and not re.search(r"[\[<|]", command):
                    found.append(command)
    return found


def check_commands_parse(path: Path) -> int:
    from dynexit.cli import build_parser

    lines = dynexit_lines(path)
    for line in lines:
        try:
            build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"{path.relative_to(ROOT)}: {line!r} does not parse (see the error above)")
    return len(lines)


def test_the_readme_is_short_and_says_how_to_install():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "## Install" in text and "pip install -e ." in text and "conda env create -f environment.yml" in text
    for forbidden in ("this machine", "quiet machine", "this CPU"):
        assert forbidden not in text, f"README.md says {forbidden!r}: measurements go to benchmarks/README.md"


def test_the_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    namespace = run_python_blocks(README, tmp_path, monkeypatch)
    assert len(blocks(README)) >= 1
    out = capsys.readouterr().out
    assert "('early3', 'att', 'cnn', 'merge')" in out and "'branchy'" in out
    assert [tuple(y.shape) for y in namespace["logits"]] == [(2, 10)] * 4


def test_the_commands_parse():
    assert check_commands_parse(README) >= 3


def test_every_dynexit_name_the_docs_use_exists():
    """``dynexit.NAME`` anywhere in the README and docs (code blocks and inline code) is a public attribute or
    a module of the package."""
    import importlib

    text = "\n".join(p.read_text() for p in [README, *sorted((ROOT / "docs").glob("**/*.md"))])
    names = set(re.findall(r"\bdynexit\.(\w+)", text))
    assert "load_backbone_weights" in names and "load_official" in names
    missing = []
    for name in sorted(names):
        if hasattr(dynexit, name):
            continue
        try:
            importlib.import_module(f"dynexit.{name}")
        except ImportError:
            missing.append(name)
    assert not missing, f"the documentation uses dynexit.{missing} which do not exist"
