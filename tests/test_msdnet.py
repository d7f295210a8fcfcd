"""MSDNet against its reference: parameter counts, per-exit costs, outputs of a reference-format checkpoint,
strict loading, conversion, and real early exit through its segments."""
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from multi_exit_checks import assert_early_exit_equals_the_simulated_policy
from torch import nn

import dynexit
from dynexit import policies
from dynexit.cli import main
from dynexit.costs import count_costs
from dynexit.inference import early_exit
from dynexit.models.checkpoint import load_model
from dynexit.models.msdnet import MSDNet, MSDNetConfig

FIXTURE = Path(__file__).parent / "fixtures" / "msdnet_cifar_anytime.json"

# The reference's parameter counts and its counter's cumulative per-exit multiply-adds (millions; conv and
# linear MACs plus ReLU and pooling elements, BatchNorm not counted), for the three published configurations.
REFERENCE = {
    "msdnet_cifar_anytime": (3_067_960, (15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94)),
    "msdnet_cifar_batch": (2_078_924, (6.86, 14.35, 27.54, 41.71, 58.48)),
    "msdnet_imagenet": (23_958_440, (339.90, 685.46, 1008.16, 1254.47, 1360.53)),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def fixture():
    return json.loads(FIXTURE.read_text())


def fixture_tensor(key: str, shape: list[int]) -> torch.Tensor:
    """The fixture's deterministic weights: a sine of the element index with a phase from the key's CRC32,
    scaled per kind of tensor (BN statistics and scales near their identity, He-like conv/linear weights)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros((), dtype=torch.long)
    phase = (zlib.crc32(key.encode()) % 997) / 97.0
    t = torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.7373 + phase)
    if leaf == "running_var":
        v = 1.0 + 0.3 * t.abs()
    elif leaf == "running_mean":
        v = 0.05 * t
    elif len(shape) == 1:
        v = 1.0 + 0.1 * t if leaf == "weight" else 0.02 * t
    else:
        v = t * math.sqrt(3.0 / math.prod(shape[1:])) * 0.9
    return v.reshape(shape).float()


def reference_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """A checkpoint laid out as the reference training script saves it (DataParallel's 'module.' prefix)."""
    return {"epoch": 299, "arch": "msdnet", "state_dict": {"module." + k: v for k, v in state.items()},
            "best_prec1": 0.0,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9, "dampening": 0,
                                                         "weight_decay": 1e-4, "nesterov": False,
                                                         "params": list(range(len(state)))}]}}


@pytest.fixture(scope="module")
def checkpoint_file(fixture, tmp_path_factory):
    path = tmp_path_factory.mktemp("msdnet") / "msdnet_cifar_anytime.pth.tar"
    torch.save(reference_checkpoint({k: fixture_tensor(k, s) for k, s in fixture["keys"]}), path)
    return path


def fixture_input(fixture) -> torch.Tensor:
    recipe = fixture["input"]
    return torch.randn(recipe["shape"], generator=torch.Generator().manual_seed(recipe["generator_seed"]))


def assert_fixture_outputs(outputs, fixture):
    reference = torch.tensor(fixture["outputs"])
    assert len(outputs) == len(reference) == fixture["num_exits"]
    for k, (got, want) in enumerate(zip(outputs, reference)):
        assert got.shape == want.shape, k
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), k


# ------------------------------------------------------------------------------ architecture and costs

@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_published_configurations_have_the_reference_parameter_count(name):
    model = dynexit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE[name][0]
    assert model.exit_names == tuple(f"exit{k + 1}" for k in range(len(REFERENCE[name][1])))


@pytest.fixture(scope="module")
def published_costs():
    return {name: count_costs(dynexit.create_model(name)) for name in REFERENCE}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_per_exit_costs_within_5_percent_of_the_reference_counter(published_costs, name):
    costs = published_costs[name]
    ratios = [m / 1e6 / ref for m, ref in zip(costs.macs, REFERENCE[name][1])]
    assert len(ratios) == len(REFERENCE[name][1])
    assert all(0.95 <= r <= 1.05 for r in ratios), ratios
    assert costs.params[-1] == REFERENCE[name][0]


def test_per_exit_parameters_equal_the_reference_counter(published_costs, fixture):
    # Both count every parameter used up to exit k, earlier classifiers included.
    assert list(published_costs["msdnet_cifar_anytime"].params) == fixture["reference_counter_params_per_exit"]
    macs = [m / 1e6 for m in published_costs["msdnet_cifar_anytime"].macs]
    assert macs == pytest.approx([m / 1e6 for m in fixture["reference_counter_macs_per_exit"]], rel=0.05)


def test_module_names_are_the_reference_state_dict_keys(fixture):
    model = dynexit.create_model(fixture["name"])
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s in fixture["keys"]]


def test_presets_are_listed_and_take_overrides():
    names = dynexit.list_models()
    assert {"msdnet_cifar_anytime", "msdnet_cifar_batch", "msdnet_imagenet", "msdnet_small"} <= set(names)
    assert "tiny_perceiver_t16" in names
    model = dynexit.create_model("msdnet_cifar_batch", num_classes=10, growthRate=8, nBlocks=3)
    assert isinstance(model, MSDNet) and model.num_exits == 3
    assert model.classifier[0].linear.out_features == 10
    assert model.config.block_layers() == [1, 2, 3]  # lin_grow: step * i + 1
    assert model.blocks[0][1].layers[0].conv_normal.net[3].out_channels == 8


def test_bad_configuration_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="x2z"):
        dynexit.create_model("msdnet_small", x2z=False)
    with pytest.raises(ValueError, match="stepmode"):
        dynexit.create_model("msdnet_small", stepmode="fast")
    with pytest.raises(ValueError, match="bnFactor"):
        dynexit.create_model("msdnet_small", bnFactor=[1, 2])
    with pytest.raises(ValueError, match="input_size"):
        dynexit.create_model("msdnet_small", input_size=64)
    with pytest.raises(ValueError, match="growthRate"):
        dynexit.create_model("msdnet_small", growthRate=5, grFactor=[1, 1, 2], bnFactor=[1, 1, 2])
    with pytest.raises(TypeError, match="nBlocks"):
        dynexit.create_model("msdnet_small", nBlocks="4")
    with pytest.raises(ValueError, match="unknown model 'msdnet_huge'"):
        dynexit.create_model("msdnet_huge")


@pytest.mark.parametrize("size", [28, 32])
def test_small_preset_runs_on_small_images(size):
    torch.manual_seed(0)
    model = dynexit.create_model("msdnet_small", input_size=size)
    x = torch.randn(3, 3, size, size)
    logits = model(x)
    assert [y.shape for y in logits] == [(3, 10)] * 4
    sum(y.square().mean() for y in logits).backward()  # every exit trains
    assert all(p.grad is not None for p in model.parameters())


def test_small_preset_costs_about_as_much_as_the_tiny_perceiver():
    small = count_costs(dynexit.create_model("msdnet_small"), input_size=28)
    tiny = count_costs(dynexit.create_model("tiny_perceiver_t16"), input_size=28)
    assert 0.5 <= small.macs[-1] / tiny.macs[-1] <= 2.0
    assert all(b > a for a, b in zip(small.macs, small.macs[1:]))


# The reference's rules for its other options, applied by hand to msdnet_small (8 layers in 4 blocks of 2,
# 3 scales, 16 channels, growth 6, reduction 0.5). prune "min": layer l (1-based) of 8 reads
# min(3, 8 - l + 2) scales and keeps min(3, 8 - l + 1); transitions after layers floor(8/3) = 2 and
# floor(16/3) = 5, halving the channels (28 -> 14, 32 -> 16). reduction 0 (prune "max", one scale dropped
# every ceil(8/3) = 3 layers): no transition, 16 + 6 l channels after layer l.
REFERENCE_PLANS = {
    "prune_min": ({"prune": "min"}, [
        [("first",), ("layer", 16, 3, 3), ("layer", 22, 3, 3), ("transition", 28, 14, 3), ("channels", 14)],
        [("layer", 14, 3, 3), ("layer", 20, 3, 3), ("channels", 26)],
        [("layer", 26, 3, 3), ("transition", 32, 16, 3), ("layer", 16, 3, 3), ("channels", 22)],
        [("layer", 22, 3, 2), ("layer", 28, 2, 1), ("channels", 34)]]),
    "no_reduction": ({"reduction": 0.0}, [
        [("first",), ("layer", 16, 3, 3), ("layer", 22, 3, 3), ("channels", 28)],
        [("layer", 28, 3, 3), ("layer", 34, 3, 2), ("channels", 40)],
        [("layer", 40, 2, 2), ("layer", 46, 2, 2), ("channels", 52)],
        [("layer", 52, 2, 1), ("layer", 58, 1, 1), ("channels", 64)]]),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PLANS))
def test_other_reference_options_follow_the_reference_rules(name):
    from dynexit.models.msdnet import Transition, block_plan, msdnet_config

    overrides, plan = REFERENCE_PLANS[name]
    assert block_plan(msdnet_config("msdnet_small", **overrides)) == plan
    model = dynexit.create_model("msdnet_small", **overrides)
    transitions = [[conv.net[0].weight.shape[:2] for conv in m.m] for m in model.modules() if isinstance(m, Transition)]
    expected = [[(t[2] * g, t[1] * g) for g in (1, 2, 4)[3 - t[3]:]] for block in plan for t in block
                if t[0] == "transition"]  # 1x1 from c_in x grFactor to c_out x grFactor at each kept scale
    assert transitions == expected
    assert [y.shape for y in model(torch.randn(2, 3, 32, 32))] == [(2, 10)] * 4


def test_without_bottleneck_each_growth_is_one_3x3_conv():
    """The first layer's new features, scale by scale (growth 6 x grFactor 1-2-4; from a finer scale half of
    it, strided): with the bottleneck a 1x1 to min(input, bnFactor x output) channels comes first, bnFactor
    of the scale the conv reads (the finer one for the strided conv)."""
    def conv_shapes(model):
        layer = model.blocks[0][1]  # the first MSDN layer: 16, 32, 64 channels at scales 0-2
        return [tuple(m.weight.shape) for m in layer.modules() if isinstance(m, nn.Conv2d)]

    assert conv_shapes(dynexit.create_model("msdnet_small", bottleneck=False)) == [
        (6, 16, 3, 3), (6, 16, 3, 3), (6, 32, 3, 3), (12, 32, 3, 3), (12, 64, 3, 3)]
    assert conv_shapes(dynexit.create_model("msdnet_small")) == [
        (6, 16, 1, 1), (6, 6, 3, 3),  # scale 0: min(16, 1 x 6)
        (6, 16, 1, 1), (6, 6, 3, 3), (12, 32, 1, 1), (6, 12, 3, 3),  # scale 1: min(16, 1 x 6), min(32, 2 x 6)
        (24, 32, 1, 1), (12, 24, 3, 3), (48, 64, 1, 1), (12, 48, 3, 3)]  # scale 2: min(32, 2 x 12), min(64, 4 x 12)


# ------------------------------------------------------------------------------------ checkpoints

def test_reference_checkpoint_gives_the_reference_outputs(fixture, checkpoint_file):
    model = dynexit.load_msdnet(dynexit.create_model(fixture["name"]), checkpoint_file).eval()
    with torch.no_grad():
        assert_fixture_outputs(model(fixture_input(fixture)), fixture)


def test_loading_is_strict_and_names_every_bad_key(fixture):
    state = {k: fixture_tensor(k, s) for k, s in fixture["keys"]}
    del state["classifier.6.linear.bias"]
    state["classifier.7.linear.weight"] = torch.zeros(100, 128)
    state["blocks.2.1.m.0.net.0.weight"] = torch.zeros(58, 117, 1, 1)
    model = dynexit.create_model(fixture["name"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        dynexit.load_msdnet(model, reference_checkpoint(state))
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "missing key classifier.6.linear.bias" in message
    assert "unexpected key classifier.7.linear.weight" in message
    assert "wrong shape for blocks.2.1.m.0.net.0.weight: checkpoint (58, 117, 1, 1), model (58, 116, 1, 1)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left untouched


def test_loading_refuses_bad_files(tmp_path):
    model = dynexit.create_model("msdnet_small")
    with pytest.raises(FileNotFoundError, match="nothing.pth.tar"):
        dynexit.load_msdnet(model, tmp_path / "nothing.pth.tar")
    (tmp_path / "corrupt.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth.tar"):
        dynexit.load_msdnet(model, tmp_path / "corrupt.pth.tar")
    # A file that would run code on loading (here: a pickled module) is refused, not executed.
    torch.save({"state_dict": model.state_dict(), "extra": nn.ReLU()}, tmp_path / "code.pth.tar")
    with pytest.raises(ValueError, match="code.pth.tar"):
        dynexit.load_msdnet(model, tmp_path / "code.pth.tar")
    torch.save({"state_dict": {"module.x": [1, 2]}}, tmp_path / "lists.pth.tar")
    with pytest.raises(ValueError, match="not tensors"):
        dynexit.load_msdnet(model, tmp_path / "lists.pth.tar")


def test_convert_cli_writes_a_dynexit_checkpoint(fixture, checkpoint_file, tmp_path, capsys):
    target = tmp_path / "msdnet.dynexit.pt"
    assert main(["convert-msdnet", str(checkpoint_file), str(target), "--model", "msdnet_cifar_anytime"]) == 0
    assert "3,067,960 parameters" in capsys.readouterr().out
    model = load_model(target)
    assert isinstance(model, MSDNet) and model.config == MSDNetConfig(**dynexit.models.MSDNET_PRESETS[fixture["name"]])
    with torch.no_grad():
        assert_fixture_outputs(model(fixture_input(fixture)), fixture)
    # An existing output is never overwritten without --force; a wrong architecture is an error naming keys.
    before = target.read_bytes()
    assert main(["convert-msdnet", str(checkpoint_file), str(target), "--model", "msdnet_cifar_anytime"]) == 1
    assert "exists" in capsys.readouterr().err
    assert target.read_bytes() == before
    other = tmp_path / "other.pt"
    assert main(["convert-msdnet", str(checkpoint_file), str(other), "--model", "msdnet_cifar_batch"]) == 1
    assert "unexpected key classifier.6.linear.weight" in capsys.readouterr().err
    assert main(["convert-msdnet", str(checkpoint_file), str(other), "--model", "tiny_perceiver_t16"]) == 1
    assert "not an MSDNet preset" in capsys.readouterr().err
    assert not other.exists()


def test_converted_overrides_are_kept(tmp_path):
    source, target = tmp_path / "small.pth.tar", tmp_path / "small.pt"
    model = dynexit.create_model("msdnet_small", num_classes=7, nBlocks=3)
    torch.save(reference_checkpoint(model.state_dict()), source)
    argv = ["convert-msdnet", str(source), str(target), "--model", "msdnet_small", "--set", "model.num_classes=7",
            "--set", "model.nBlocks=3"]
    assert main(argv) == 0
    loaded = load_model(target)
    assert loaded.config.num_classes == 7 and loaded.num_exits == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# ------------------------------------------------------------------------------------- early exit

def test_early_exit_equals_the_simulated_policy():
    torch.manual_seed(0)
    model = dynexit.create_model("msdnet_small", input_size=28).double().eval()
    x = torch.randn(20, 3, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_early_exit_equals_the_simulated_policy(model, x, batch_sizes=(20, 7, 1))


def test_early_exit_runs_each_block_only_for_the_samples_still_running(monkeypatch):
    model = dynexit.create_model("msdnet_small").eval()
    calls = []
    original = model.run_segment

    def run_segment(k, s):
        calls.append((k, s.features[0].shape[0]))
        return original(k, s)

    monkeypatch.setattr(model, "run_segment", run_segment)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        conf = policies.confidence(torch.stack(model(x)).numpy())
    calls.clear()
    thresholds = [np.sort(conf[0])[3], np.inf, -np.inf, 0.0]  # 3 leave at exit 1, the rest at exit 3
    _, exits = early_exit(model, x, thresholds)
    assert exits.tolist().count(0) == 3 and exits.tolist().count(2) == 3
    assert calls == [(0, 6), (1, 3), (2, 3)]


def test_costs_cli_counts_msdnet(capsys):
    assert main(["costs", "msdnet_small", "--input-size", "28"]) == 0
    out = capsys.readouterr().out
    assert all(f"exit{k}" in out for k in range(1, 5))
    costs = count_costs(dynexit.create_model("msdnet_small"), input_size=28)
    assert set(costs.component_params) == set(costs.component_macs) == {"cnn", "heads"}  # blocks, classifiers
    assert sum(costs.component_macs.values()) == costs.macs[-1]
    assert sum(costs.component_params.values()) == costs.params[-1]
