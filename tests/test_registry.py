"""A new method is one module: a family the package does not ship, registered here and nowhere else, works
through create_model, list_models, specs, checkpoints, costs, the command line and the conformance checks."""
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from multi_exit_checks import assert_early_exit_equals_the_simulated_policy, assert_segments_are_the_forward_pass
from torch import nn

import dynexit
import dynexit.models
from dynexit.cli import main as cli_main
from dynexit.config import RunConfig, build_configured_model, merge, validate_run_config
from dynexit.costs import count_costs
from dynexit.models import FAMILIES, ModelFamily, register_family
from dynexit.models.checkpoint import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class ChainConfig:
    num_classes: int = 10
    input_size: int = 16
    width: int = 4
    blocks: int = 3

    def __post_init__(self):
        if self.blocks < 2:
            raise ValueError(f"model field 'blocks' must be at least 2, got {self.blocks}")


class ChainState(NamedTuple):
    x: torch.Tensor
    logits: tuple = ()


class Chain(nn.Module):
    """Convolution blocks, an exit after each."""

    def __init__(self, cfg: ChainConfig):
        super().__init__()
        self.config = cfg
        self.exit_names = tuple(f"block{i + 1}" for i in range(cfg.blocks))
        self.blocks = nn.ModuleList(nn.Conv2d(3 if i == 0 else cfg.width, cfg.width, 3, padding=1)
                                    for i in range(cfg.blocks))
        self.heads = nn.ModuleList(nn.Linear(cfg.width, cfg.num_classes) for _ in range(cfg.blocks))

    def init_state(self, images):
        return ChainState(images)

    def run_segment(self, k, s):
        x = torch.relu(self.blocks[k](s.x))
        return ChainState(x, (*s.logits, self.heads[k](x.mean((2, 3)))))

    def forward(self, images):
        s = self.init_state(images)
        for k in range(len(self.exit_names)):
            s = self.run_segment(k, s)
        return list(s.logits)


@pytest.fixture
def chain_family():
    family = register_family(ModelFamily(name="chain", config_class=ChainConfig, build=Chain,
                                         presets={"chain_3": {}, "chain_2_wide": {"blocks": 2, "width": 8}},
                                         description="convolutions with an exit after each"))
    yield family
    del FAMILIES["chain"]


def test_a_registered_family_works_everywhere(chain_family, tmp_path, capsys):
    assert {"chain_3", "chain_2_wide"} <= set(dynexit.list_models())
    model = dynexit.create_model("chain_3", num_classes=5).eval()
    assert model.exit_names == ("block1", "block2", "block3") and model.config.num_classes == 5
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16, 16)
    assert_segments_are_the_forward_pass(model, x, drop_after=0, keep=[1, 4])
    assert_early_exit_equals_the_simulated_policy(model, x, batch_sizes=(1, 5), settings=3)
    # costs: three 3x3 convolutions (3->4, 4->4, 4->4 channels) on 16x16, and a 4->5 linear head after each
    conv = [16 * 16 * 4 * c * 9 for c in (3, 4, 4)]
    assert count_costs(model).macs == tuple(sum(conv[:k + 1]) + 20 * (k + 1) for k in range(3))
    # checkpoints rebuild it from its family, with no factory and no consent needed
    save_model(tmp_path / "chain.pt", model)
    loaded = load_model(tmp_path / "chain.pt")
    assert isinstance(loaded, Chain) and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # specs
    cfg = merge(RunConfig, {"model": {"name": "chain_2_wide", "num_classes": 10}, "data": {"image_size": 16},
                            "eval": {"grid": "msdnet"}})
    validate_run_config(cfg)
    assert build_configured_model(cfg.model).exit_names == ("block1", "block2")
    bad = merge(RunConfig, {"model": {"name": "chain_3", "depth": 3}})
    with pytest.raises(ValueError, match=r"model.depth: not a setting of chain_3 \(chain\)"):
        validate_run_config(bad)
    # the command line
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "chain_2_wide" in out and "convolutions with an exit after each" in out


def test_a_family_must_not_take_another_familys_names(chain_family):
    with pytest.raises(ValueError, match="registered already"):
        register_family(ModelFamily(name="chain", config_class=ChainConfig, build=Chain, presets={}))
    with pytest.raises(ValueError, match="belongs to family 'chain'"):
        register_family(ModelFamily(name="other", config_class=ChainConfig, build=Chain, presets={"chain_3": {}}))
    with pytest.raises(ValueError, match="model preset 'bad'"):
        register_family(ModelFamily(name="other", config_class=ChainConfig, build=Chain,
                                    presets={"bad": {"blocks": 1}}))
    assert "other" not in FAMILIES


def test_a_misspelt_preset_gets_the_closest_names():
    with pytest.raises(ValueError, match="did you mean tiny_perceiver_t16"):
        dynexit.create_model("tiny_perceiver_t61")


def conformance_size(preset: str) -> dict:
    """Small settings every preset builds with: 10 classes, and 64 px (MSDNet keeps its own input size:
    its scales are tied to it)."""
    family = dynexit.models.family_of(preset)
    small = {"num_classes": 10}
    if family.name != "msdnet":
        small["input_size"] = 64
    return small


@pytest.mark.parametrize("preset", dynexit.list_models())
def test_every_registered_preset_meets_the_interface(preset):
    """The conformance checks, on every preset any family registers: its segments are its forward pass,
    samples can be dropped between them, and its exits have valid names."""
    from dynexit.models.interface import check_multi_exit_model

    torch.manual_seed(0)
    settings = conformance_size(preset)
    model = dynexit.create_model(preset, **settings).eval()
    names = check_multi_exit_model(model, need_segments=True)
    size = settings.get("input_size") or model.config.input_size
    x = torch.randn(3, 3, size, size)
    assert_segments_are_the_forward_pass(model, x, drop_after=0, keep=[0, 2])
    assert len(names) == len(model(x[:1]))
