import itertools

import pytest
import torch
from multi_exit_checks import assert_segments_are_the_forward_pass
from official_layout import OFFICIAL_MODELS, ablated_keys, deterministic_weights, load_fixture

import dynexit
from dynexit.models.official import convert_state_dict

SWITCHES = ("x2z", "z2x", "dwc", "isc", "last_ca")
ALL_COMBINATIONS = [dict(zip(SWITCHES, flags)) for flags in itertools.product([True, False], repeat=5)]
FIXTURE_FLAGS = {"with_x2z": "x2z", "with_z2x": "z2x", "with_dwc": "dwc", "with_isc": "isc", "with_last_CA": "last_ca"}


@pytest.mark.parametrize("name", OFFICIAL_MODELS)
def test_official_equivalence(name):
    """Every exit reproduces the official outputs on the fixture's weights and input."""
    fixture = load_fixture(name)
    flags = {ours: fixture["config"][theirs] for theirs, ours in FIXTURE_FLAGS.items()}
    model = dynexit.create_model(name, depth_factor=fixture["config"]["depth_factor"], **flags)
    dynexit.load_official(model, {"model": deterministic_weights(fixture["keys"])})
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(x)
    assert list(model.exit_names) == fixture["exit_names"]
    for exit_name, y in zip(model.exit_names, outputs):
        ref = fixture["outputs"][exit_name]
        assert y.shape == ref.shape
        assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), exit_name


@pytest.mark.parametrize("name,params", [
    ("reg800m_perceiver_t128", 21_798_360),
    ("resnet50_0375_perceiver_t128", 20_283_336),
    ("mobilenetV3_0x75_perceiver_t128", 9_299_040),
])
def test_parameter_counts_equal_official(name, params):
    model = dynexit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) <= len(load_fixture(name)["keys"])  # fused q/k/v: fewer, never more


@pytest.mark.parametrize("name", OFFICIAL_MODELS)
@pytest.mark.parametrize("flags", ALL_COMBINATIONS, ids=lambda f: "-".join(k for k, v in f.items() if not v) or "full")
def test_official_layout_of_every_switch_combination_loads_strictly(name, flags):
    """For each combination, the official key list (derived from the full one) maps one-to-one onto
    the dynexit model: nothing missing, nothing left over, every shape right."""
    keys = ablated_keys(load_fixture(name)["keys"], **flags)
    model = dynexit.create_model(name, **flags)
    state = convert_state_dict(deterministic_weights(keys), model)
    assert set(state) == set(model.state_dict())


def test_ablated_official_weights_change_only_what_the_switch_removes():
    """Without the last cross-attention the merge exit sees the CNN exit's pooled features: loading the
    same official weights, the three earlier exits are unchanged and only the merge exit differs."""
    name = "reg800m_perceiver_t128"
    full = deterministic_weights(load_fixture(name)["keys"])
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    outs = {}
    for last_ca in (True, False):
        model = dynexit.create_model(name, last_ca=last_ca)
        state = {k: v for k, v in full.items() if last_ca or not k.startswith("last_cross_att_z2x.")}
        dynexit.load_official(model, state)
        with torch.no_grad():
            outs[last_ca] = model.eval()(x)
    for k in range(3):
        torch.testing.assert_close(outs[True][k], outs[False][k])
    assert (outs[True][3] - outs[False][3]).abs().max() > 1e-3


def test_load_official_names_every_bad_key():
    name = "mobilenetV3_0x75_perceiver_t128"
    state = deterministic_weights(load_fixture(name)["keys"])
    del state["isc3.0.weight"]
    state["surplus.weight"] = torch.zeros(3)
    state["early_classifier3.weight"] = torch.zeros(7, 64)
    model = dynexit.create_model(name)
    with pytest.raises(ValueError) as err:
        dynexit.load_official(model, state)
    message = str(err.value)
    assert "missing key exits.att.isc.0.weight" in message
    assert "unexpected key surplus.weight" in message
    assert "early_classifier3.weight" in message and "(7, 64)" in message


def test_load_official_accepts_checkpoint_layouts(tmp_path):
    name = "resnet50_0375_perceiver_t128"
    state = deterministic_weights(load_fixture(name)["keys"])
    reference = dynexit.load_official(dynexit.create_model(name), state).state_dict()
    for wrapper in ({"model": state, "epoch": 3}, {"model_ema": state}, {"state_dict": state},
                    {f"module.{k}": v for k, v in state.items()}):
        path = tmp_path / "ckpt.pth"
        torch.save(wrapper, path)
        loaded = dynexit.load_official(dynexit.create_model(name), path).state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_load_official_bad_files(tmp_path):
    model = dynexit.create_model("tiny_perceiver_t16")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        dynexit.load_official(model, tmp_path / "nothing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        dynexit.load_official(model, corrupt)


def test_every_preset_builds_with_its_settings():
    names = dynexit.list_models()
    for required in ["reg400m_perceiver_t32", "reg800m_perceiver_t512", "reg1x6g_perceiver_t256",
                     "reg3x2g_perceiver_t128", "resnet50_0375_perceiver_t128", "mobilenetV3_0x75_perceiver_t128"]:
        assert required in names
    # the Dyn-Perceiver presets (MSDNet: test_msdnet.py; branchy: test_branchy.py)
    for name in sorted(dynexit.models.PRESETS):
        assert name in names
        model = dynexit.create_model(name)
        cfg = model.config
        widths = [stage.self_attn[0].attn.qkv.in_features for stage in model.latent_stages]
        assert widths == list(model.backbone.stage_channels), name
        assert model.latent.shape == (cfg.num_latents, model.backbone.stage_channels[0])
        depths = [len(stage.self_attn) for stage in model.latent_stages]
        assert depths == [b * f for b, f in zip(cfg.sa_layers, cfg.depth_factor)]
        if name.startswith("reg"):
            assert cfg.depth_factor == [1, 1, 1, 2] and depths == [3, 3, 9, 6]
    assert dynexit.preset_config("resnet50_0375_perceiver_t128").depth_factor == [1, 1, 1, 1]
    assert dynexit.preset_config("mobilenetV3_0x75_perceiver_t128").depth_factor == [1, 1, 1, 3]
    cfg = dynexit.preset_config("reg800m_perceiver_t128")
    assert (cfg.widening, cfg.num_classes, cfg.input_size) == (4, 1000, 224)
    assert all(getattr(cfg, s) for s in SWITCHES)


def test_overrides_reach_the_architecture():
    model = dynexit.create_model("reg400m_perceiver_t64", num_classes=7, num_latents=32, depth_factor=[1, 2, 1, 1],
                                 num_heads=[1, 1, 2, 2], widening=2, x2z=False, token_grid=5)
    assert model.latent.shape[0] == 32
    assert [len(s.self_attn) for s in model.latent_stages] == [3, 6, 9, 3]
    assert model.latent_stages[0].self_attn[0].mlp.fc1.out_features == 2 * model.backbone.stage_channels[0]
    assert model.latent_stages[0].x2z.cross.attn.key_pos.shape[1] == 25
    assert all(s.x2z is None for s in model.latent_stages[1:])
    assert model.exits["merge"].fc[-1].out_features == 7


def test_unknown_preset_or_override_lists_the_valid_ones():
    with pytest.raises(ValueError, match="reg800m_perceiver_t128"):
        dynexit.create_model("reg900m_perceiver")
    with pytest.raises(ValueError, match="x2z"):
        dynexit.create_model("tiny_perceiver_t16", with_x2z=False)
    with pytest.raises(TypeError, match="num_classes"):
        dynexit.create_model("tiny_perceiver_t16", num_classes="ten")
    with pytest.raises(ValueError, match="depth_factor"):
        dynexit.create_model("tiny_perceiver_t16", depth_factor=[1, 1])


@pytest.mark.parametrize("flags", ALL_COMBINATIONS, ids=lambda f: "-".join(k for k, v in f.items() if not v) or "full")
def test_every_switch_combination_trains_at_32px(flags):
    """Forward and backward at 32x32 on the real RegNetY-800MF architecture: four finite exits, and
    every parameter receives a gradient."""
    torch.manual_seed(0)
    model = dynexit.create_model("reg800m_perceiver_t128", num_classes=10, input_size=32, **flags).train()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(y.shape) for y in outputs] == [(2, 10)] * 4
    assert all(torch.isfinite(y).all() for y in outputs)
    sum(y.square().mean() for y in outputs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    removed = {"x2z": "latent_stages.1.x2z", "z2x": "latent_stages.1.z2x", "dwc": "latent_stages.0.x2z.dwc",
               "isc": "exits.att.isc", "last_ca": "exits.merge.cross"}
    names = {n for n, _ in model.named_parameters()}
    for switch, prefix in removed.items():
        assert any(n.startswith(prefix) for n in names) == flags[switch], switch


@pytest.mark.parametrize("name", OFFICIAL_MODELS)
@pytest.mark.parametrize("size", [28, 224])
def test_any_input_size(name, size):
    torch.manual_seed(0)
    model = dynexit.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, size, size))
    assert [tuple(y.shape) for y in outputs] == [(1, 10)] * 4
    assert all(torch.isfinite(y).all() for y in outputs)


def test_static_backbone_has_one_exit():
    model = dynexit.create_model("tiny_perceiver_t16", static=True)
    assert model.exit_names == ("cnn",)
    out = model(torch.randn(3, 3, 28, 28))
    assert len(out) == 1 and out[0].shape == (3, 10)
    full = dynexit.create_model("tiny_perceiver_t16")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


def test_segments_are_the_forward_pass():
    """Running the segments one by one gives exactly the outputs of forward, also on a subset of samples."""
    torch.manual_seed(0)
    model = dynexit.create_model("tiny_perceiver_t16").eval()
    # drop samples 1, 2 and 4 after the second exit
    assert_segments_are_the_forward_pass(model, torch.randn(5, 3, 32, 32), drop_after=1, keep=[0, 3])
