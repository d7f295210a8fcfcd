"""A model's state may be a NamedTuple, a dataclass or a dict, with or without ``select``; whatever
``init_state`` computes counts in the first exit; element-wise ops count as zero and any other op fvcore
cannot count needs a handle, given as an argument. Counts are checked against hand counts."""
import dataclasses
from typing import NamedTuple

import pytest
import torch
from torch import nn

from dynexit.costs import count_costs
from dynexit.inference import early_exit, run_to_exit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE, WIDTH, CLASSES = 8, 4, 10
STEM = SIZE * SIZE * WIDTH * 3 * 9  # 3x3 convolution 3 -> 4 channels, padding 1, on 8x8
BLOCK = SIZE * SIZE * WIDTH * WIDTH * 9  # 3x3 convolution 4 -> 4 channels
HEAD = WIDTH * CLASSES  # linear head on the pooled features (the mean counts zero)


@dataclasses.dataclass
class DataState:
    x: torch.Tensor
    logits: tuple = ()


class TupleState(NamedTuple):
    x: torch.Tensor
    logits: tuple = ()


class TwoExits(nn.Module):
    """A stem in init_state, then two segments of a convolution and a head; ``state`` picks the state type."""

    exit_names = ("first", "second")
    input_size = SIZE

    def __init__(self, state: str, extra_op: bool = False):
        super().__init__()
        self.state, self.extra_op = state, extra_op
        self.stem = nn.Conv2d(3, WIDTH, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList([nn.Identity(), nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False)])
        self.heads = nn.ModuleList([nn.Linear(WIDTH, CLASSES, bias=False) for _ in range(2)])

    def make(self, x, logits):
        return {"dict": lambda: {"x": x, "logits": logits}, "dataclass": lambda: DataState(x, logits),
                "namedtuple": lambda: TupleState(x, logits)}[self.state]()

    def init_state(self, images):
        return self.make(self.stem(images), ())

    def run_segment(self, k, s):
        x = s["x"] if isinstance(s, dict) else s.x
        logits = s["logits"] if isinstance(s, dict) else s.logits
        x = 1 - torch.relu(self.blocks[k](x))  # rsub: element-wise
        if self.extra_op:
            x = torch.cumsum(x, dim=1)  # an op fvcore has no handle for
        return self.make(x, (*logits, self.heads[k](x.mean((2, 3)))))

    def forward(self, images):
        s = self.init_state(images)
        for k in range(2):
            s = self.run_segment(k, s)
        return list(s["logits"] if isinstance(s, dict) else s.logits)


@pytest.mark.parametrize("state", ["dict", "dataclass", "namedtuple"])
def test_costs_count_init_state_in_the_first_exit_for_any_state_type(state):
    costs = count_costs(TwoExits(state))
    assert costs.macs == (STEM + HEAD, STEM + HEAD + BLOCK + HEAD)
    assert costs.params == (WIDTH * 3 * 9 + HEAD, WIDTH * 3 * 9 + HEAD + WIDTH * WIDTH * 9 + HEAD)


@pytest.mark.parametrize("state", ["dict", "dataclass", "namedtuple"])
def test_early_exit_works_for_any_state_type(state):
    torch.manual_seed(0)
    model = TwoExits(state).eval()
    x = torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        first, last = run_to_exit(model, x, 0), run_to_exit(model, x, 1)
    conf = first.softmax(-1).max(-1).values
    threshold = float(conf.median())
    predictions, exits = early_exit(model, x, [threshold, 0.0])
    leaves = conf >= threshold
    assert 0 < int(leaves.sum()) < 6  # some leave early, some go on: the state was cut to the rest
    assert torch.equal(exits, (~leaves).long())
    assert torch.equal(predictions, torch.where(leaves, first.argmax(-1), last.argmax(-1)))


def test_an_op_without_a_handle_is_named_and_a_handle_counts_it():
    model = TwoExits("dict", extra_op=True)
    with pytest.raises(ValueError, match=r"aten::cumsum .*segment 0.*handles="):
        count_costs(model)
    zero = count_costs(model, handles={"aten::cumsum": None})
    assert zero.macs == (STEM + HEAD, STEM + 2 * HEAD + BLOCK)
    per_element = count_costs(model, handles={"aten::cumsum": lambda inputs, outputs: 7})
    assert per_element.macs == (STEM + HEAD + 7, STEM + 2 * HEAD + BLOCK + 14)
    with pytest.raises(ValueError, match="aten::"):
        count_costs(model, handles={"cumsum": None})


def extra_op_model(input_size: int = SIZE) -> TwoExits:
    """A factory for the command line and specs (``test_model_states:extra_op_model``)."""
    return TwoExits("dataclass", extra_op=True)


def test_the_command_line_and_a_spec_give_op_handles(tmp_path, capsys):
    from dynexit.cli import main as cli_main
    from dynexit.config import RunConfig, merge, validate_run_config
    from dynexit.costs import resolve_handles

    assert cli_main(["costs", "test_model_states:extra_op_model"]) == 1
    assert "aten::cumsum" in capsys.readouterr().err
    csv = tmp_path / "costs.csv"
    assert cli_main(["costs", "test_model_states:extra_op_model", "--op-handle", "aten::cumsum=zero",
                     "--csv", str(csv)]) == 0
    assert csv.read_text().splitlines()[1].split(",")[:2] == ["first", "0"]
    cfg = merge(RunConfig, {"model": {"factory": "test_model_states:extra_op_model",
                                      "op_handles": {"aten::cumsum": "zero"}}, "eval": {"grid": "msdnet"}})
    validate_run_config(cfg)
    assert resolve_handles(cfg.model.op_handles) == {"aten::cumsum": None}
    bad = merge(RunConfig, {"model": {"factory": "test_model_states:extra_op_model",
                                      "op_handles": {"aten::cumsum": "not a function"}}, "eval": {"grid": "msdnet"}})
    with pytest.raises(ValueError, match="model.op_handles"):
        validate_run_config(bad)


@pytest.mark.parametrize("names", [("first", "final"), ("at_0.1", "second")])
def test_exit_names_that_collide_with_summary_columns_are_refused_naming_them(names):
    from dynexit.models.interface import check_multi_exit_model

    model = TwoExits("dict")
    model.exit_names = names
    with pytest.raises(TypeError, match=f"exit name {names[0] if names[0] != 'first' else names[1]!r} is reserved"):
        check_multi_exit_model(model)


def test_a_failed_runs_error_says_which_setting_explains_it():
    from types import SimpleNamespace

    from dynexit.runs.execute import failure_hint

    run = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(channels_last=True)))
    err = RuntimeError("view size is not compatible with input tensor's size and stride")
    assert "train.channels_last: false" in failure_hint(err, run)
    run.config.train.channels_last = False
    assert failure_hint(err, run) == ""
