"""x2z's pooled depthwise convolution as one strided convolution: the plain path's outputs and gradients, and
taken only where it is meant to be."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynexit.models.pooled_depthwise as pooled
from dynexit import create_model
from dynexit.models.pooled_depthwise import box_sum, pooled_depthwise_residual, pooling_cell


def depthwise(channels: int, dtype=torch.float32) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(channels, channels, 7, padding=3, groups=channels).to(dtype)


def plain(x: torch.Tensor, conv: nn.Conv2d, grid: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(conv(x) + x, grid)


def test_box_sum_is_the_full_convolution_with_ones():
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert box_sum(t, 2, 1).tolist() == [[1.0, 3.0, 5.0, 7.0, 4.0]]
    assert box_sum(t, 3, 1).tolist() == [[1.0, 3.0, 6.0, 9.0, 7.0, 4.0]]


@pytest.mark.parametrize("shape, grid, channels_last", [
    ((3, 5, 32, 32), 4, False),   # cells of 8 x 8
    ((2, 6, 64, 48), 4, True),    # cells of 16 x 12, channels_last
    ((1, 4, 56, 56), 7, False),   # reg800m's second map
])
def test_same_output_and_gradients_as_the_plain_path(shape, grid, channels_last):
    conv = depthwise(shape[1], torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert pooling_cell(x, conv, grid) == (shape[2] // grid, shape[3] // grid)
    upstream = torch.randn(shape[0], shape[1], grid, grid, dtype=torch.float64)
    results = []
    for fn in (plain, pooled_depthwise_residual):
        x_ = x.detach().clone().requires_grad_()
        out = fn(x_, conv, grid)
        grads = torch.autograd.grad((out * upstream).sum(), (x_, conv.weight, conv.bias))
        results.append((out, grads))
    (out_plain, grads_plain), (out_strided, grads_strided) = results
    assert (out_plain - out_strided).abs().max() <= 1e-12 * out_plain.abs().max()
    for name, a, b in zip(("input", "weight", "bias"), grads_plain, grads_strided):
        assert (a - b).abs().max() <= 1e-12 * a.abs().max(), name


def test_float32_matches_the_plain_path_to_rounding():
    conv = depthwise(32)
    x = torch.randn(1, 32, 112, 112)
    with torch.no_grad():
        ref, out = plain(x, conv, 7), pooled_depthwise_residual(x, conv, 7)
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # fvcore traces this way too
def test_the_strided_path_is_taken_on_uniform_cells_of_min_cell_pixels_only():
    conv = depthwise(2)
    side = 8 * pooled.MIN_CELL
    assert pooling_cell(torch.randn(1, 2, side, side), conv, 8) == (pooled.MIN_CELL, pooled.MIN_CELL)
    assert pooling_cell(torch.randn(1, 2, side - 8, side - 8), conv, 8) is None  # cells of MIN_CELL - 1 pixels
    assert pooling_cell(torch.randn(1, 2, side + 1, side), conv, 8) is None  # uneven cells
    handle = conv.register_forward_hook(lambda *_: None)
    assert pooling_cell(torch.randn(1, 2, side, side), conv, 8) is None  # a hook on the convolution sees it
    handle.remove()
    decisions = []

    class X2zPooling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = depthwise(2)

        def forward(self, x):
            decisions.append(pooling_cell(x, self.conv, 8))
            return pooled_depthwise_residual(x, self.conv, 8)

    graph = torch.jit.trace(X2zPooling(), torch.randn(1, 2, side, side), check_trace=False).inlined_graph
    assert decisions == [None]  # fvcore's counts trace the plain convolution
    convs = [n for n in graph.nodes() if "conv" in n.kind()]
    assert convs and all("cumsum" not in n.kind() for n in graph.nodes())


def test_a_perceiver_training_step_gets_the_plain_paths_loss_and_gradients(monkeypatch):
    # tiny_perceiver_t16 at 32 px: its first two x2z maps (32x32 in a 4x4 grid, cells of 8) take the strided
    # path, the other two the plain one. In float64, so that the two paths agree to rounding: in float32
    # every gradient of the model already differs from float64's by about 1e-4, either way.
    model = create_model("tiny_perceiver_t16", input_size=32).double()
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    taken, kernel = [], pooled.pooled_kernel

    def counted_kernel(weight, cell):
        taken.append(cell)
        return kernel(weight, cell)

    monkeypatch.setattr(pooled, "pooled_kernel", counted_kernel)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = sum(F.cross_entropy(logits, labels) for logits in model(images))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_strided, grads_strided = step()
    assert taken == [(8, 8), (8, 8)]
    monkeypatch.setattr(pooled, "MIN_CELL", 10**6)
    loss_plain, grads_plain = step()
    assert len(taken) == 2  # the second step took the plain path throughout
    assert (loss_strided - loss_plain).abs() <= 1e-12 * loss_plain.abs()
    assert grads_strided.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        # The absolute floor covers the biases whose true gradient is 0 (before a LayerNorm): rounding, 1e-13.
        assert (grads_strided[name] - g).abs().max() <= 1e-9 * g.abs().max() + 1e-12, name
