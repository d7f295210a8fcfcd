"""Pinned cost counts (golden multiply-adds, as fvcore and detectron2 pin theirs).

Each number is exact: one attention layer, one LayerNorm and one pooled depthwise convolution counted by
hand here, and the per-exit multiply-adds of one preset of each family at 32 px, which a second counter
written here (forward hooks, no fvcore) reproduces from the layers' shapes. A change of any counted
component, however small (attention is 0.4-5.3 % of an exit), changes a pinned number.
"""
import pytest
import torch
from timm.layers import DropPath
from torch import nn

import dynexit
from dynexit.costs import count_costs, count_macs
from dynexit.models.layers import (
    CrossAttention,
    CrossAttentionLayer,
    FeaturesToLatents,
    SelfAttention,
    SelfAttentionLayer,
)
from dynexit.models.pooled_depthwise import pooled_depthwise_residual, pooling_cell

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py

# Cumulative multiply-adds of each exit at 32 px (count_costs, fvcore's convention: one multiply-add = 1).
PINNED_32PX = {
    "tiny_perceiver_t16": (12_755_584, 17_539_520, 21_223_104, 21_843_008),
    "msdnet_small": (7_345_728, 13_821_056, 18_547_392, 22_534_400),
    "branchy_resnet_tiny": (5_276_288, 9_004_928, 12_706_176, 16_389_760),
}
# The tiny Dyn-Perceiver's whole-model multiply-adds by component at 32 px.
TINY_COMPONENTS_32PX = {"cnn": 16_355_328, "x2z": 2_543_872, "latent": 215_552, "z2x": 2_104_704,
                        "heads": 7_488, "last_ca": 616_064}
# The three official models at 224 px, 1000 classes (count_costs): per exit.
PINNED_OFFICIAL = {
    "reg800m_perceiver_t128": (469_828_656, 1_080_581_104, 1_245_526_864, 1_316_607_120),
    "mobilenetV3_0x75_perceiver_t128": (103_687_160, 189_650_624, 215_210_624, 275_217_104),
    "resnet50_0375_perceiver_t128": (631_826_712, 1_022_663_832, 1_137_701_400, 1_206_390_552),
}


class OnTokens(nn.Module):
    """``layer`` applied to the (1, 3, S, S) image read as (1, tokens, channels) tokens, so that ``count_macs``
    (which feeds one image) counts a token layer alone; with ``context``, the layer also reads the first
    ``context`` tokens as its context. Reshapes and slices cost nothing."""

    def __init__(self, layer: nn.Module, tokens: int, channels: int, context: int | None = None):
        super().__init__()
        self.layer, self.tokens, self.channels, self.context = layer, tokens, channels, context

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(1, self.tokens, self.channels)
        return self.layer(x) if self.context is None else self.layer(x, x[:, :self.context])


def test_one_layer_norm_counts_five_per_element():
    """fvcore's LayerNorm convention: 5 per element with its affine weights."""
    assert count_macs(OnTokens(nn.LayerNorm(12), 16, 12), 8) == 16 * 12 * 5 == 960


def test_one_self_attention_layer_by_hand():
    """16 tokens of 12 channels, 2 heads of 6, MLP widening 2: every term written out."""
    tokens, c, heads, widening = 16, 12, 2, 2
    norm = tokens * c * 5
    qkv = tokens * c * 3 * c
    attention = heads * tokens * tokens * (c // heads + c // heads)  # Q.K^T and attention.V, per head
    proj = tokens * c * c
    mlp = norm + tokens * c * widening * c + tokens * widening * c * c
    assert attention == 6_144
    layer = SelfAttentionLayer(c, heads, widening)
    assert count_macs(OnTokens(layer, tokens, c), 8) == norm + qkv + attention + proj + mlp == 26_496
    assert count_macs(OnTokens(SelfAttention(c, heads), tokens, c), 8) == qkv + attention + proj


def test_one_cross_attention_layer_by_hand():
    """16 queries of 12 channels read 4 context tokens of 12 channels through one head of 3 channels."""
    queries, keys, c, qk = 16, 4, 12, 3
    norms = queries * c * 5 + keys * c * 5
    projections = queries * c * qk + keys * c * 2 * qk + queries * qk * c  # q, kv, out
    attention = queries * keys * (qk + qk)
    mlp = queries * c * 5 + 2 * queries * c * c  # widening 1
    assert attention == 384
    layer = CrossAttentionLayer(c, c, qk, key_tokens=keys)
    assert count_macs(OnTokens(layer, queries, c, context=keys), 8) == norms + projections + attention + mlp == 8_592
    attn = CrossAttention(c, c, qk)
    assert count_macs(OnTokens(attn, queries, c, context=keys), 8) == projections + attention


class PooledDepthwise(nn.Module):
    def __init__(self, channels: int, grid: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.grid = grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pooled_depthwise_residual(images, self.conv, self.grid)


def test_one_pooled_depthwise_convolution_counts_the_full_convolution_and_the_pooling():
    """x2z's depthwise 7x7 convolution pooled to a 2x2 grid, on a 3 x 16 x 16 map: run as one strided
    convolution (8-pixel cells), counted as the architecture's work: 49 multiply-adds per element for the
    full convolution, 1 per element for the average pooling (fvcore's convention), the residual add free."""
    module = PooledDepthwise(3, 2)
    assert pooling_cell(torch.zeros(1, 3, 16, 16), module.conv, 2) == (8, 8)  # the strided path runs
    assert count_macs(module, 16) == 3 * 16 * 16 * 49 + 3 * 16 * 16 == 38_400


# --------------------------------------------------------------------------------- whole presets

def hook_count(model: nn.Module, size: int) -> tuple[int, ...]:
    """Cumulative multiply-adds of each exit counted from the layers' shapes by forward hooks (no fvcore),
    in fvcore's conventions: convolutions and linear layers, batch norms (2 per element in eval), layer
    norms (5), adaptive average pooling (1 per input element), attention (Q.K^T and attention.V);
    element-wise work, means and fixed pooling free. Any other kind of leaf module is refused."""
    known = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.AdaptiveAvgPool2d,
             nn.ReLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Identity, nn.Dropout, nn.AvgPool2d,
             nn.MaxPool2d, DropPath)
    leaves = {type(m) for m in model.modules() if not list(m.children())}
    assert all(issubclass(t, known) for t in leaves), leaves
    total = [0]

    def count(m, args, out):
        x = args[0]
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += x.numel() * m.out_features
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            total[0] += x.numel() * 2
        elif isinstance(m, nn.LayerNorm):
            total[0] += x.numel() * 5
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            total[0] += x.numel()
        elif isinstance(m, SelfAttention):  # heads x N^2 x (d + d) = 2 N^2 C
            total[0] += 2 * x.shape[1] ** 2 * x.shape[2]
        elif isinstance(m, CrossAttention):
            total[0] += 2 * x.shape[1] * args[1].shape[1] * m.qk_channels
        elif isinstance(m, FeaturesToLatents) and m.dwc is not None:  # its functional pooling of the map
            total[0] += x.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            s = model.init_state(torch.zeros(1, 3, size, size))
            cumulative = []
            for k in range(len(model.exit_names)):
                s = model.run_segment(k, s)
                cumulative.append(total[0])
    finally:
        for h in hooks:
            h.remove()
    return tuple(cumulative)


@pytest.mark.parametrize("name", sorted(PINNED_32PX))
def test_per_exit_macs_of_one_preset_of_each_family_are_pinned(name):
    model = dynexit.create_model(name)
    assert count_costs(model, input_size=32).macs == PINNED_32PX[name]
    assert hook_count(model, 32) == PINNED_32PX[name]  # the pin justified by an independent count


def test_tiny_perceiver_components_are_pinned():
    costs = count_costs(dynexit.create_model("tiny_perceiver_t16"), input_size=32)
    assert costs.component_macs == TINY_COMPONENTS_32PX


@pytest.mark.parametrize("name", sorted(PINNED_OFFICIAL))
def test_official_models_per_exit_macs_are_pinned(name):
    model = dynexit.create_model(name)
    assert count_costs(model).macs == PINNED_OFFICIAL[name]
    assert hook_count(model, 224) == PINNED_OFFICIAL[name]
