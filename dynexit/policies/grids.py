"""Grids of target exit shares: the full-range default, the official protocol's and MSDNet's."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


GRIDS = ("full", "official", "msdnet")  # the budgeted protocol's grids of target shares
DEFAULT_GRID = "full"  # runs, reports and the command line: every budget from the first exit to the last
OFFICIAL_SCALES = (0.85, 1.0, 0.5)  # official rescaling of the shares of exits 1-3 (4 exits)


def _geometric_shares(q: float, num_exits: int) -> torch.Tensor:
    """q^[1..K] normalised, in torch float32 (the arithmetic of the official and MSDNet code)."""
    import torch

    shares = torch.exp(torch.log(torch.tensor(q, dtype=torch.float32))
                       * torch.arange(1, num_exits + 1, dtype=torch.float32))
    return shares / shares.sum()


def official_grid(num_exits: int = 4, scales: Sequence[float] | None = None) -> np.ndarray:
    """Target shares (33, num_exits) float32 of Dynamic Perceiver's ``generate_distribution``.

    For q in 0.20, 0.25, ..., 1.00 (17 values) then 20/20, 20/19, ..., 20/5 (16 values; q = 1
    appears twice, as in the official list): shares proportional to q^[1..K]; then for each exit
    j < K-1 in turn the share of exit j is multiplied by ``scales[j]`` and the later shares are
    rescaled to fill 1 - (sum of shares up to j). Computed in torch float32 on the CPU like the
    official code. The official code's own values differ between devices by a few float32 ulps
    (its exp/log differ between CPU and CUDA), which changes n_k = floor(N p_k) only for rare N
    (none of 1,000, 12,928 or 50,000); pass the exact proportions as an array to reproduce a
    recorded run.

    ``scales`` defaults to the official (0.85, 1, 0.5), which is defined for 4 exits only; for any
    other number of exits, pass K-1 factors (all ones gives the plain geometric grid) or use
    :func:`msdnet_grid`.
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    if scales is None:
        if num_exits != 4:
            raise ValueError(f"the official grid's rescaling factors {OFFICIAL_SCALES} are defined for 4 "
                             f"exits, not {num_exits}; pass scales= ({num_exits - 1} factors) or use "
                             "the msdnet grid")
        scales = OFFICIAL_SCALES
    scales = [float(s) for s in scales]
    if len(scales) != num_exits - 1 or any(not np.isfinite(s) or s < 0 for s in scales):
        raise ValueError(f"scales must be {num_exits - 1} non-negative factors, got {scales}")
    qs = [i / 20 for i in range(4, 21)] + [20 / i for i in range(20, 4, -1)]
    rows = []
    for q in qs:
        p = _geometric_shares(q, num_exits)
        for j, scale in enumerate(scales):
            p[j] *= scale
            tail = p[j + 1:]
            p[j + 1:] = (1 - p[:j + 1].sum()) * tail / tail.sum()
        rows.append(p.numpy())
    return np.stack(rows)


def msdnet_grid(num_exits: int, num: int = 39) -> np.ndarray:
    """Target shares (num, num_exits) float32 of MSDNet's budgeted protocol: q_k proportional to p^k
    (k = 1..K) for p = 1/20, 2/20, ..., num/20. MSDNet's dynamic evaluation takes p = 1/20 .. 39/20
    (39 points), each p a float32 of the double p/20, and computes the shares in torch float32."""
    if num_exits < 1 or num < 1:
        raise ValueError(f"need num_exits >= 1 and num >= 1, got num_exits={num_exits}, num={num}")
    return np.stack([_geometric_shares(i / 20, num_exits).numpy() for i in range(1, num + 1)])


FULL_SPAN = 3.1  # |log q| of the full grid's outermost geometric points: within 5 % of the cost range's ends
FULL_MAX_GAP = 0.05  # the largest gap between neighbouring nominal costs, as a share of the cost range
FULL_MIN_POINTS = 40


def full_grid(num_exits: int) -> np.ndarray:
    """Target shares (points, num_exits) float32 spanning every budget: the first row sends every sample to
    the first exit, the last row every sample to the last, and between them geometric shares q_k
    proportional to q^k (k = 1..K, as the protocol grids) for log q evenly spaced over
    [-FULL_SPAN, FULL_SPAN].

    Why these points: the nominal expected cost sum_k q_k c_k of increasing costs c rises with log q, at a
    rate (the covariance of c_k and k under the shares) of at most (c_K - c_1) (K - 1) / 4; steps of
    log q of 4 FULL_MAX_GAP / (K - 1) therefore keep neighbouring nominal costs within FULL_MAX_GAP of the
    cost range, whatever the costs. At |log q| = FULL_SPAN the shares beyond the first exit (or before
    the last) sum to less than q / (1 - q) < 5 %, so the end rows are within 5 % too. At least
    FULL_MIN_POINTS points; one row for a single exit.
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    if num_exits == 1:
        return np.ones((1, 1), dtype=np.float32)
    step = 4 * FULL_MAX_GAP / (num_exits - 1)
    inner = max(int(np.ceil(2 * FULL_SPAN / step)) + 1, FULL_MIN_POINTS - 2)
    log_q = np.linspace(-FULL_SPAN, FULL_SPAN, inner)
    k = np.arange(num_exits)
    weights = np.exp(log_q[:, None] * (k - (num_exits - 1) / 2))  # centred exponent: no overflow
    shares = weights / weights.sum(axis=1, keepdims=True)
    first, last = np.eye(num_exits)[[0, -1]]
    return np.vstack([first, shares, last]).astype(np.float32)


def resolve_grid(grid: str | np.ndarray | Sequence[Sequence[float]], num_exits: int) -> np.ndarray:
    """``"full"``, ``"official"``, ``"msdnet"`` or an explicit (points, exits) array of target shares ->
    float32."""
    if isinstance(grid, str):
        if grid == "full":
            return full_grid(num_exits)
        if grid == "official":
            return official_grid(num_exits)
        if grid == "msdnet":
            return msdnet_grid(num_exits)
        raise ValueError(f"unknown grid {grid!r}; use {' or '.join(map(repr, GRIDS))} or an array of shares")
    arr = np.asarray(grid, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != num_exits or len(arr) == 0:
        raise ValueError(f"grid must have shape (points, {num_exits}), got {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("grid shares must be finite and non-negative")
    return arr
