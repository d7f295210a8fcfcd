"""x2z's pooled depthwise backward: the plain forward bit for bit, autograd's gradients, and taken only where
it is meant to be."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynexit.models.pooled_depthwise as pooled
from dynexit import create_model
from dynexit.models.pooled_depthwise import PooledDepthwiseResidual, pooled_depthwise_residual, takes_pooled_backward


def depthwise(channels: int, dtype=torch.float32) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(channels, channels, 7, padding=3, groups=channels).to(dtype)


def plain(x: torch.Tensor, conv: nn.Conv2d, grid: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(conv(x) + x, grid)


def test_gradients_pass_the_numerical_check_in_float64_with_uneven_cells():
    # 11 rows and 9 columns in a 3x3 grid: adaptive pooling's cells differ in size and overlap.
    conv = depthwise(2, torch.float64)
    x = torch.randn(2, 2, 11, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PooledDepthwiseResidual.apply, (x, conv.weight, conv.bias, 3))


@pytest.mark.parametrize("shape, grid, channels_last", [((3, 5, 32, 32), 4, False), ((2, 6, 30, 23), 4, True)])
def test_same_output_and_autograds_gradients_as_the_plain_path(shape, grid, channels_last):
    conv = depthwise(shape[1])
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(shape[0], shape[1], grid, grid)
    results = []
    for fn in (plain, lambda x, conv, grid: PooledDepthwiseResidual.apply(x, conv.weight, conv.bias, grid)):
        x_ = x.detach().clone().requires_grad_()
        out = fn(x_, conv, grid)
        grads = torch.autograd.grad((out * upstream).sum(), (x_, conv.weight, conv.bias))
        results.append((out, grads))
    (out_plain, grads_plain), (out_pooled, grads_pooled) = results
    assert torch.equal(out_plain, out_pooled)  # the same ops forward
    for name, a, b in zip(("input", "weight", "bias"), grads_plain, grads_pooled):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), name


def test_only_the_gradients_asked_for_are_computed(monkeypatch):
    def weight_gradient_computed(*_):
        raise AssertionError("the weight gradient was computed for a frozen convolution")

    monkeypatch.setattr(pooled, "_cell_masks", weight_gradient_computed)  # the weight gradient's first step
    conv = depthwise(3).requires_grad_(False)
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    out = PooledDepthwiseResidual.apply(x, conv.weight, conv.bias, 2)
    (gx,) = torch.autograd.grad(out.sum(), (x,))
    x_ = x.detach().clone().requires_grad_()
    assert torch.allclose(gx, torch.autograd.grad(plain(x_, conv, 2).sum(), (x_,))[0], atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # fvcore traces this way too
def test_the_pooled_path_is_taken_for_training_on_large_cells_only():
    conv = depthwise(2)
    big = torch.randn(1, 2, 8 * pooled.MIN_CELL, 8 * pooled.MIN_CELL, requires_grad=True)
    small = torch.randn(1, 2, 8 * pooled.MIN_CELL - 1, 8 * pooled.MIN_CELL - 1, requires_grad=True)
    assert takes_pooled_backward(big, conv, 8)
    assert not takes_pooled_backward(small, conv, 8)  # cells of MIN_CELL - 1 pixels
    with torch.no_grad():
        assert not takes_pooled_backward(big, conv, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_pooled_backward(big, conv, 8)
    frozen = depthwise(2).requires_grad_(False)
    assert not takes_pooled_backward(big.detach(), frozen, 8)  # nothing to differentiate
    handle = conv.register_forward_hook(lambda *_: None)
    assert not takes_pooled_backward(big, conv, 8)  # a hook on the convolution sees its output
    handle.remove()
    decisions = []

    class X2zPooling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = depthwise(2)

        def forward(self, x):
            decisions.append(takes_pooled_backward(x, self.conv, 8))
            return pooled_depthwise_residual(x, self.conv, 8)

    graph = torch.jit.trace(X2zPooling(), big, check_trace=False).inlined_graph
    assert decisions == [False]  # fvcore's counts trace the plain convolution
    assert any("conv" in node.kind() for node in graph.nodes())


def test_a_perceiver_training_step_gets_the_plain_paths_gradients(monkeypatch):
    # tiny_perceiver_t16 at 32 px: its first two x2z maps (32x32 in a 4x4 grid, cells of 8) take the pooled
    # backward, the other two the plain one. In float64, so that the two paths agree to rounding: in float32
    # every gradient of the model already differs from float64's by about 1e-4, either way.
    model = create_model("tiny_perceiver_t16", input_size=32).double()
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    maps = [st.x2z for st in model.latent_stages if st.x2z is not None]
    taken, apply = [], PooledDepthwiseResidual.apply

    def counted_apply(x, *rest):
        taken.append(x.shape)
        return apply(x, *rest)

    monkeypatch.setattr(PooledDepthwiseResidual, "apply", counted_apply)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = sum(F.cross_entropy(logits, labels) for logits in model(images))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_pooled, grads_pooled = step()
    assert [s[-1] for s in taken] == [32, 32] and len(maps) == 4
    monkeypatch.setattr(pooled, "MIN_CELL", 10**6)
    loss_plain, grads_plain = step()
    assert len(taken) == 2  # the second step took the plain path throughout
    assert torch.equal(loss_pooled, loss_plain)
    assert grads_pooled.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        # The absolute floor covers the biases whose true gradient is 0 (before a LayerNorm): rounding, 1e-13.
        assert (grads_pooled[name] - g).abs().max() <= 1e-9 * g.abs().max() + 1e-12, name
