"""x2z's ``adaptive_avg_pool2d(depthwise_conv(x) + x, grid)`` with a backward that uses the pooling.

x2z reads its depthwise 7x7 convolution (the ``dwc`` switch) only through the average pooling to the
token grid. The gradient that reaches the convolution's output is therefore constant over each pooling
cell, and the weight gradient, a full correlation of the map with that gradient under autograd (slow on
CPUs: ``benchmarks/bench_depthwise.py``), reduces to sums of the map over the cells shifted by each tap:
one matmul over rows and a small contraction over columns. The forward is the plain one, op for op, so
outputs and fvcore's costs do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# Pooling cells at least this many pixels high and wide take the pooled backward. Measured with
# `python benchmarks/bench_depthwise.py --pooled` on reg800m_perceiver_t128's maps (7x7 grid): faster by
# 1.4-2.6x with cells of 16 and 8 pixels, even with 4, slower with 2, where the per-cell work dominates.
MIN_CELL = 8


def pool_cells(n: int, grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling's [start, end) along an axis of ``n`` for each of ``grid`` cells."""
    i = torch.arange(grid, device=device)
    return (i * n) // grid, -((-(i + 1) * n) // grid)


def _cell_masks(n: int, grid: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(k, grid, n): 1 where tap t of a k-tap kernel, at an output position inside cell i, reads input n."""
    start, end = pool_cells(n, grid, device)
    taps = torch.arange(k, device=device)[:, None, None] - k // 2
    output = torch.arange(n, device=device) - taps  # the output position whose tap t reads input n
    return ((output >= start[:, None]) & (output < end[:, None])).to(dtype)


class PooledDepthwiseResidual(torch.autograd.Function):
    """adaptive_avg_pool2d(conv2d(x, weight, bias, padding=k // 2, groups=C) + x, grid)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.grid, ctx.has_bias = grid, bias is not None
        y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
        return F.adaptive_avg_pool2d(y + x, grid)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        grid, (b, c, h, w), k = ctx.grid, x.shape, weight.shape[-1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x:
            grad_map = torch.ops.aten._adaptive_avg_pool2d_backward(g, x)  # g spread evenly over each cell
            gx = F.conv2d(grad_map, weight.flip(-2, -1), padding=k // 2, groups=c) + grad_map
        if need_w:
            in_row = _cell_masks(h, grid, k, x.device, x.dtype)
            in_col = _cell_masks(w, grid, k, x.device, x.dtype)
            r0, r1 = pool_cells(h, grid, x.device)
            c0, c1 = pool_cells(w, grid, x.device)
            # Sums of x over each tap's shifted cell rows: (B, k, grid, W, C) in one matmul.
            rows = (in_row.view(k * grid, h) @ x.permute(0, 2, 3, 1).reshape(b, h, w * c)).view(b, k, grid, w, c)
            # The cell gradient per pixel (g / cell area), spread over each tap's shifted cell columns.
            g_cell = (g / ((r1 - r0)[:, None] * (c1 - c0)).to(g.dtype)).permute(0, 2, 3, 1)  # (B, i, j, C)
            spread = (in_col.transpose(1, 2).reshape(k * w, grid) @ g_cell).view(b, grid, k, w, c)
            gw = torch.einsum("byisc,bixsc->cyx", rows, spread).unsqueeze(1).to(weight.dtype)
        if need_b and ctx.has_bias:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


def takes_pooled_backward(x: torch.Tensor, conv: nn.Conv2d, grid: int) -> bool:
    """Whether ``pooled_depthwise_residual`` runs the custom backward for this call: only when a backward
    will follow, on maps whose cells are large enough to gain, and never where another machinery traces
    the model (jit tracing for fvcore's counts, torch.compile), recasts its ops (autocast) or watches the
    convolution (its forward hooks, which the custom path would skip)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or conv.weight.requires_grad):
        return False
    if conv._forward_hooks or conv._forward_pre_hooks:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return min(x.shape[-2], x.shape[-1]) // grid >= MIN_CELL


def pooled_depthwise_residual(x: torch.Tensor, conv: nn.Conv2d, grid: int) -> torch.Tensor:
    """adaptive_avg_pool2d(conv(x) + x, grid) for x2z's depthwise ``conv``, the same forward either way."""
    if takes_pooled_backward(x, conv, grid):
        return PooledDepthwiseResidual.apply(x, conv.weight, conv.bias, grid)
    return F.adaptive_avg_pool2d(conv(x) + x, grid)
