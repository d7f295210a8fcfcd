"""x2z's ``adaptive_avg_pool2d(depthwise_conv(x) + x, grid)`` as one strided depthwise convolution.

x2z reads its depthwise 7x7 convolution (the ``dwc`` switch), and the map it is added to, only through the
average pooling to the token grid. Where the pooling cells are uniform (the map a whole number of cells of
s_h x s_w pixels), that pooled sum is itself a depthwise convolution of the map: stride (s_h, s_w), a kernel
of (s_h + 6) x (s_w + 6) taps, each the sum of the 7x7 weights that reach it from anywhere in the cell (plus
1 for the pixels of the cell itself), over the cell's area. It reads the map once and writes only the token
grid, instead of writing and reading back a full-size map, forward and in autograd's backward
(``python benchmarks/bench_depthwise.py --pooled``). It equals the plain path up to float rounding.

The plain path stays where the cells are not uniform, where they are smaller than ``MIN_CELL`` pixels, where
jit traces the model (fvcore counts the official architecture's work, the full convolution) and where hooks
watch the convolution (the strided path never calls it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Cells at least this many pixels high and wide take the strided path. It is faster in training on every map
# measured (cells of 2-16 pixels) and at batch 1 down to cells of 4 (`bench_depthwise.py --pooled`); the floor
# keeps the runs at 28 px (cells of 7 pixels at most) on the plain path, so x2z computes the committed 28 px
# studies as when they were made (they predate z2x's contiguous tokens, and reproduce within their seed spread).
MIN_CELL = 8


def box_sum(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Sums of ``size`` consecutive entries along ``dim`` over every overlap with ``t`` (zeros outside):
    the full convolution of ``t`` with ``size`` ones, ``size - 1`` entries longer than ``t``."""
    n = t.shape[dim]
    pad = [0, 0] * (t.dim() - 1 - dim) + [size, size - 1]
    running = F.pad(t, pad).cumsum(dim)
    return running.narrow(dim, size, n + size - 1) - running.narrow(dim, 0, n + size - 1)


def pooled_kernel(weight: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """The (C, 1, s_h + k - 1, s_w + k - 1) kernel of ``avg_pool(conv(x, weight, padding=k // 2) + x, cell)``."""
    (s_h, s_w), k = cell, weight.shape[-1]
    kernel = box_sum(box_sum(weight, s_h, 2), s_w, 3)
    identity = F.pad(weight.new_ones(1, 1, s_h, s_w), (k // 2, k // 2, k // 2, k // 2))
    return (kernel + identity) / (s_h * s_w)


def pooling_cell(x: torch.Tensor, conv: nn.Conv2d, grid: int) -> tuple[int, int] | None:
    """The (s_h, s_w) cell of the strided path for this call, or None where the plain path runs."""
    if conv._forward_hooks or conv._forward_pre_hooks or torch.jit.is_tracing() or torch.jit.is_scripting():
        return None
    h, w = x.shape[-2:]
    if h % grid or w % grid or min(h, w) // grid < MIN_CELL:
        return None
    return h // grid, w // grid


def strided_pooled_depthwise(x: torch.Tensor, conv: nn.Conv2d, cell: tuple[int, int]) -> torch.Tensor:
    """avg_pool2d(conv(x) + x, cell) as one strided depthwise convolution, for any uniform ``cell``."""
    return F.conv2d(x, pooled_kernel(conv.weight, cell), conv.bias, stride=cell, padding=conv.padding,
                    groups=x.shape[1])


def pooled_depthwise_residual(x: torch.Tensor, conv: nn.Conv2d, grid: int) -> torch.Tensor:
    """adaptive_avg_pool2d(conv(x) + x, grid) for x2z's depthwise ``conv`` (k x k, padding k // 2, stride 1)."""
    cell = pooling_cell(x, conv, grid)
    if cell is None:
        return F.adaptive_avg_pool2d(conv(x) + x, grid)
    return strided_pooled_depthwise(x, conv, cell)
