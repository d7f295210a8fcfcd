"""The README's Python snippets run as written: every ```python block, in order, in one namespace, in a
scratch folder. Blocks that need ImageNet are skipped by name; files a block names (``*.pth``) are made
there first by ``STAND_INS`` (same layout as the real files, deterministic or random weights)."""
import argparse
import re
from pathlib import Path

import pytest
import torch
from official_layout import deterministic_weights, load_fixture

import dynexit

README = Path(__file__).parent.parent / "README.md"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


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


def test_the_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    runnable = [code for code in blocks if not needs_imagenet(code)]
    assert len(blocks) - len(runnable) == 1  # the official ImageNet evaluation
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, code in enumerate(runnable):
        for name in sorted(set(re.findall(r"\"([\w.-]+\.pth(?:\.tar)?)\"", code))):
            assert name in STAND_INS, f"README block {index} reads {name}: add a stand-in to STAND_INS"
            STAND_INS[name](tmp_path / name)
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    assert len(runnable) >= 3
    # What the blocks say they print and compute.
    out = capsys.readouterr().out
    assert "('early3', 'att', 'cnn', 'merge')" in out and "reg800m_perceiver_t128" in out
    # The weights block loaded the stand-ins: official weights outside the backbone, torchvision's inside.
    model = namespace["model"]
    official = deterministic_weights(load_fixture("reg800m_perceiver_t128")["keys"])
    assert torch.equal(model.latent, official["latent"])
    regnet = torch.load(tmp_path / "regnet_y_800mf.pth", weights_only=True)
    assert torch.equal(model.backbone.state_dict()["stem.0.weight"], regnet["stem.0.weight"])
    # The last block's results.
    assert namespace["preds"].shape == namespace["exits"].shape == (len(namespace["images"]),)
    costs = namespace["costs"]
    assert namespace["curve"]["test_expected_cost"].between(costs.min() - 1e-9, costs.max() + 1e-9).all()
    assert (tmp_path / "logits_test.npz").is_file()


def test_every_dynexit_name_the_readme_uses_exists():
    """``dynexit.NAME`` anywhere in the README (code blocks and inline code) is a public attribute or a
    module of the package."""
    import importlib

    text = README.read_text()
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
    assert not missing, f"README uses dynexit.{missing} which do not exist"
