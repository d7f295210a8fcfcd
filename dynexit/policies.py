"""Exit policies: confidence criteria, thresholds and the budgeted protocol, vectorized over samples.

Layout: per-exit logits are one array of shape (exits, samples, classes); confidences, predictions
and correctness are (exits, samples). Nothing here loops over samples in Python.

Exit policy: a sample leaves at the first exit whose confidence is >= that exit's threshold; the last
exit takes everyone left, whatever its threshold. Thresholds never look at labels.

Budgeted protocol (Dynamic Perceiver / MSDNet): for a row of target shares p (one per exit), the
threshold of exit k < K-1 is the confidence of the n_k-th most confident calibration sample among
those that have not exited yet, n_k = floor(N * p_k); it is ``NEVER`` (1e8) when n_k is 0 or fewer
samples remain, ``ALWAYS`` (-1e8) when n_k is every sample left (a share that sends everyone there, such
as the full grid's first point: on the test split too, everyone leaves there; the papers' grids never
ask for it), and the last exit gets ``ALWAYS``. The numbers follow the official float32
arithmetic: softmax in torch float32, n_k computed in float32, thresholds float32, expected cost
accumulated in float32, so thresholds equal the official ones bit for bit.

Columns of :func:`budgeted_curve` (one row per operating point, in grid order), where ``<e>`` is the
exit name when ``exit_names`` is given and the 0-based exit index otherwise:
``point`` (row of the grid), ``target_share_<e>``, ``threshold_<e>``, ``criterion``, ``temperature_<e>``
(empty when no temperature was used; with the thresholds, these make each row a complete
:class:`ExitPolicy`), ``calib_accuracy``,
``calib_expected_cost``, ``test_accuracy``, ``test_expected_cost`` (accuracies in percent, costs in
the unit of ``costs``), ``calib_share_<e>`` and ``test_share_<e>`` (fraction of the split exiting at
each exit).

Exit scoring (:func:`exit_scores`) is the one implementation of the criteria: the simulated policy here and
real early exit (:mod:`dynexit.inference`) both call it. torch and pandas are imported by the functions
that use them, so that the command line can read ``CRITERIA`` and ``GRIDS`` without loading them.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

CRITERIA = ("max_softmax", "entropy", "margin")  # the confidence criteria, in the order --help lists them
GRIDS = ("full", "official", "msdnet")  # the budgeted protocol's grids of target shares
DEFAULT_GRID = "full"  # runs, reports and the command line: every budget from the first exit to the last
NEVER = np.float32(1e8)  # threshold of an exit nobody leaves at
ALWAYS = np.float32(-1e8)  # threshold of the last exit: everyone left leaves there
OFFICIAL_SCALES = (0.85, 1.0, 0.5)  # official rescaling of the shares of exits 1-3 (4 exits)
_CHUNK = 8192  # samples per softmax call: bounds the temporary memory on ImageNet-sized arrays


# ----------------------------------------------------------------------------------------- checks

def _is_tensor(value) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    return torch is not None and isinstance(value, torch.Tensor)


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def _as_logits(logits, name: str = "logits") -> np.ndarray:
    """``logits`` as a C-contiguous float32 array (exits, samples, classes)."""
    if _is_tensor(logits):
        logits = logits.detach().cpu().numpy()
    arr = np.asarray(logits)
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (exits, samples, classes), got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_targets(targets, num_samples: int, num_classes: int, name: str = "targets") -> np.ndarray:
    if _is_tensor(targets):
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets)
    if arr.ndim != 1 or len(arr) != num_samples:
        raise ValueError(f"{name} must have shape ({num_samples},) to match the logits, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    if len(arr) and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} holds class indices outside [0, {num_classes}): "
                         f"min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64, copy=False)


def check_costs(costs, exit_names: Sequence[str] | None = None, where: str = "costs") -> np.ndarray:
    """Per-exit cumulative costs as float64: finite, non-negative and strictly increasing from exit to exit
    (each exit runs everything before it), else a ValueError naming ``where``, the exits and their values."""
    arr = np.asarray(costs, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{where} must be finite and non-negative, got {arr.tolist()}")
    names = ([str(n) for n in exit_names] if exit_names is not None and len(exit_names) == len(arr)
             else [str(k) for k in range(len(arr))])
    for k in range(1, len(arr)):
        if arr[k] <= arr[k - 1]:
            raise ValueError(f"{where}: cumulative costs must increase strictly from exit to exit, but exit "
                             f"{names[k]!r} costs {arr[k]:g}, not more than exit {names[k - 1]!r} before it "
                             f"({arr[k - 1]:g}); costs: {', '.join(f'{n}={c:g}' for n, c in zip(names, arr))}")
    return arr


def _as_costs(costs, num_exits: int, exit_names: Sequence[str] | None = None) -> np.ndarray:
    arr = np.asarray(costs, dtype=np.float64).reshape(-1)
    if len(arr) != num_exits:
        raise ValueError(f"costs has {len(arr)} values but there are {num_exits} exits")
    return check_costs(arr, exit_names)


def _as_temperatures(temperature, num_exits: int) -> np.ndarray | None:
    if temperature is None:
        return None
    arr = np.asarray(temperature, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, num_exits)
    if len(arr) != num_exits:
        raise ValueError(f"temperature has {len(arr)} values but there are {num_exits} exits")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"temperatures must be finite and positive, got {arr.tolist()}")
    return arr


def _names(exit_names: Sequence[str] | None, num_exits: int) -> list[str]:
    if exit_names is None:
        return [str(k) for k in range(num_exits)]
    names = [str(n) for n in exit_names]
    if len(names) != num_exits or len(set(names)) != num_exits:
        raise ValueError(f"exit_names must be {num_exits} distinct names, got {names}")
    return names


# --------------------------------------------------------------------------------------- criteria

def scores(logits, criterion: str = "max_softmax",
           temperature: float | Sequence[float] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Confidence and predicted class of every exit and sample, in one pass over the logits.

    Returns ``(conf, pred)``, both (exits, samples): ``conf`` float32 (higher = more confident),
    ``pred`` int64, the index of the largest softmax probability at temperature 1 (first index on
    ties, like torch's ``max``). ``temperature`` (one value or one per exit) divides the logits
    before the confidence is computed; it never changes the prediction.

    Criteria: ``max_softmax`` (largest probability; computed with torch's float32 softmax, as the
    official protocol does, so values match it bit for bit), ``entropy`` (the negated entropy of the
    softmax, in nats, so that higher is more confident) and ``margin`` (largest minus second largest
    probability).
    """
    import torch

    check_criterion(criterion)
    arr = _as_logits(logits)
    num_exits, num_samples, _ = arr.shape
    temps = _as_temperatures(temperature, num_exits)
    conf = np.empty((num_exits, num_samples), dtype=np.float32)
    pred = np.empty((num_exits, num_samples), dtype=np.int64)
    with torch.inference_mode():
        for k in range(num_exits):
            for start in range(0, num_samples, _CHUNK):
                stop = min(start + _CHUNK, num_samples)
                conf[k, start:stop], pred[k, start:stop] = exit_scores(
                    arr[k, start:stop], criterion, None if temps is None else temps[k])
    bad = ~np.isfinite(conf)
    if bad.any():
        k, i = np.argwhere(bad)[0]
        raise ValueError(f"logits of exit {k} are not finite (sample {i} among others)")
    return conf, pred


def exit_scores(logits, criterion: str = "max_softmax", temperature: float | None = None):
    """Confidence (float32) and predicted class (int64) of one exit's ``logits`` (samples, classes): the one
    scoring code. A torch tensor gives tensors (on its device), a NumPy array gives arrays, with equal
    numbers: softmax in torch float32; the prediction is the index of the largest probability at
    temperature 1 (first index on ties); ``temperature`` divides the logits for the confidence only.
    Criteria: see :func:`scores`.
    """
    import torch

    check_criterion(criterion)
    tensor = isinstance(logits, torch.Tensor)
    z = logits.float() if tensor else torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (samples, classes), got {tuple(z.shape)}")
    probs = torch.softmax(z, dim=-1)
    top, pred = probs.max(dim=-1)
    if temperature is not None:
        probs = torch.softmax(z / float(temperature), dim=-1)
        top = probs.max(dim=-1).values
    conf = _criterion(probs, top, criterion)
    return (conf, pred) if tensor else (conf.numpy(), pred.numpy())


def _criterion(probs: torch.Tensor, top: torch.Tensor, criterion: str) -> torch.Tensor:
    import torch

    if criterion == "max_softmax":
        return top
    if criterion == "entropy":
        return -torch.special.entr(probs).sum(dim=-1)  # sum p log p = -H, 0 log 0 = 0
    if probs.shape[-1] < 2:  # one class: the runner-up probability is 0
        return top
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def confidence(logits, criterion: str = "max_softmax",
               temperature: float | Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Confidence (exits, samples) float32 of logits (exits, samples, classes); see :func:`scores`."""
    return scores(logits, criterion, temperature)[0]


def fit_temperatures(logits, targets, bounds: tuple[float, float] = (0.05, 20.0),
                     tol: float = 1e-7, max_iter: int = 100) -> np.ndarray:
    """Per-exit temperatures T (float64, one per exit) minimising the mean negative log-likelihood of
    ``softmax(logits / T)`` on ``targets`` (fit them on the calibration split, never on test).

    The NLL is convex in beta = 1/T, so each exit is a safeguarded Newton search on beta within
    ``bounds`` (a temperature at a bound means the optimum lies beyond it).
    """
    arr = _as_logits(logits)
    num_exits, num_samples, num_classes = arr.shape
    y = _as_targets(targets, num_samples, num_classes)
    lo_t, hi_t = bounds
    if not 0 < lo_t < hi_t:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    temps = np.empty(num_exits)
    for k in range(num_exits):
        z = arr[k].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)  # beta * z <= 0: exp never overflows
        z_y = z[np.arange(num_samples), y]

        def grad_hess(beta: float, z: np.ndarray = z, z_y: np.ndarray = z_y) -> tuple[float, float]:
            w = np.exp(beta * z)
            w /= w.sum(axis=1, keepdims=True)
            mean = (w * z).sum(axis=1)
            var = (w * z * z).sum(axis=1) - mean * mean
            return float((mean - z_y).mean()), float(var.mean())

        lo, hi = 1.0 / hi_t, 1.0 / lo_t
        if grad_hess(lo)[0] >= 0:
            temps[k] = hi_t
        elif grad_hess(hi)[0] <= 0:
            temps[k] = lo_t
        else:
            beta = min(max(1.0, lo), hi)
            for _ in range(max_iter):
                g, h = grad_hess(beta)
                if g > 0:
                    hi = beta
                else:
                    lo = beta
                step = beta - g / h if h > 0 else np.nan
                new = step if lo < step < hi else 0.5 * (lo + hi)
                done = abs(new - beta) <= tol * beta
                beta = new
                if done:
                    break
            temps[k] = 1.0 / beta
        log.debug("exit %d: temperature %.4f", k, temps[k])
    return temps


# ------------------------------------------------------------------------------------- thresholds

def assign_exits(conf: np.ndarray, thresholds) -> np.ndarray:
    """Exit index (int64, one per sample) of confidences ``conf`` (exits, samples): the first exit k
    with ``conf[k] >= thresholds[k]``; the last exit takes everyone left (its threshold is ignored)."""
    conf = np.asarray(conf)
    thresholds = np.asarray(thresholds)
    if conf.ndim != 2 or thresholds.shape != (conf.shape[0],):
        raise ValueError(f"need conf (exits, samples) and one threshold per exit, got conf {conf.shape} "
                         f"and thresholds {thresholds.shape}")
    num_exits = conf.shape[0]
    exits = np.full(conf.shape[1], num_exits - 1, dtype=np.int64)
    for k in range(num_exits - 2, -1, -1):  # backwards: the earliest qualifying exit wins
        exits[conf[k] >= thresholds[k]] = k
    return exits


def find_thresholds(conf: np.ndarray, proportions) -> np.ndarray:
    """Thresholds (float32, one per exit) of the budgeted protocol for target shares ``proportions``
    on calibration confidences ``conf`` (exits, samples); see the module docstring.

    The shares are taken in float32 and n_k = floor(float32(N) * p_k) is computed in float32, as the
    official code does, so that n_k (and hence the threshold) is the official one.
    """
    conf = np.asarray(conf)
    if conf.ndim != 2:
        raise ValueError(f"conf must have shape (exits, samples), got {conf.shape}")
    num_exits, num_samples = conf.shape
    p = np.asarray(proportions, dtype=np.float32).reshape(-1)
    if len(p) != num_exits:
        raise ValueError(f"proportions has {len(p)} values but there are {num_exits} exits")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"proportions must be finite and non-negative, got {p.tolist()}")
    wanted = np.floor(np.float32(num_samples) * p).astype(np.int64)
    thresholds = np.full(num_exits, NEVER, dtype=np.float32)
    thresholds[-1] = ALWAYS
    remaining = np.ones(num_samples, dtype=bool)
    for k in range(num_exits - 1):
        candidates = conf[k][remaining]
        n = int(wanted[k])
        if 0 < n == len(candidates):
            thresholds[k] = ALWAYS  # everyone left leaves here, also test samples below the calibration minimum
        elif 0 < n < len(candidates):
            # the n-th largest = the (len - n)-th smallest; ties give the same value in any order
            thresholds[k] = np.partition(candidates, len(candidates) - n)[len(candidates) - n]
        remaining &= ~(conf[k] >= thresholds[k])
    return thresholds


@dataclass(frozen=True)
class SplitResult:
    """Outcome of thresholds on one split.

    accuracy: percent of all samples classified correctly at their exit.
    expected_cost: sum over exits of (share exiting there) * cost.
    shares: (exits,) fraction of samples exiting at each exit.
    exit_accuracy: (exits,) percent correct among the samples exiting there (NaN where none do).
    """

    accuracy: float
    expected_cost: float
    shares: np.ndarray
    exit_accuracy: np.ndarray


def evaluate_thresholds(conf: np.ndarray, correct: np.ndarray, thresholds, costs) -> SplitResult:
    """Applies ``thresholds`` to one split with precomputed confidences ``conf`` and correctness
    ``correct`` (both (exits, samples); ``correct = pred == targets``). Cheap enough to call
    thousands of times a minute on ImageNet-sized splits (no softmax, no sort).

    ``expected_cost`` follows the official float32 arithmetic (float32 shares times float32 costs,
    summed in exit order in float32), so it equals the official figure bit for bit.
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.shape != np.shape(conf):
        raise ValueError(f"correct {correct.shape} and conf {np.shape(conf)} must have the same shape")
    num_exits, num_samples = correct.shape
    costs = _as_costs(costs, num_exits)
    exits = assign_exits(conf, thresholds)
    hit = correct.reshape(-1)[exits * num_samples + np.arange(num_samples)]
    counts = np.bincount(exits, minlength=num_exits)
    right = np.bincount(exits, weights=hit, minlength=num_exits)
    shares32 = counts.astype(np.float32) / np.float32(num_samples)
    total = np.float32(0.0)
    for term in shares32 * costs.astype(np.float32):
        total = np.float32(total + term)
    with np.errstate(invalid="ignore", divide="ignore"):
        exit_accuracy = right * 100.0 / counts
    return SplitResult(accuracy=int(right.sum()) * 100.0 / num_samples, expected_cost=float(total),
                       shares=counts / num_samples, exit_accuracy=exit_accuracy)


# ------------------------------------------------------------------------------------------ grids

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


# ----------------------------------------------------------------------------------------- curves

def policy_columns(criterion: str, temperatures, exit_names: Sequence[str]) -> dict[str, str | float]:
    """The columns that make a curve row a complete :class:`ExitPolicy` besides its thresholds: ``criterion``
    and ``temperature_<exit>`` (NaN, an empty CSV cell, when the confidences used no temperature)."""
    check_criterion(criterion)
    temps = _as_temperatures(temperatures, len(exit_names))
    columns: dict[str, str | float] = {"criterion": criterion}
    columns.update({f"temperature_{n}": (np.nan if temps is None else float(t))
                    for n, t in zip(exit_names, temps if temps is not None else [None] * len(exit_names))})
    return columns


def curve_from_scores(calib_conf: np.ndarray, calib_correct: np.ndarray, test_conf: np.ndarray,
                      test_correct: np.ndarray, costs, grid=DEFAULT_GRID,
                      exit_names: Sequence[str] | None = None, criterion: str = "max_softmax",
                      temperatures=None) -> pd.DataFrame:
    """:func:`budgeted_curve` on precomputed confidences and correctness (exits, samples); ``criterion`` and
    ``temperatures`` are those the confidences were computed with (written to every row)."""
    import pandas as pd

    if np.shape(calib_conf)[0] != np.shape(test_conf)[0]:
        raise ValueError(f"calibration has {np.shape(calib_conf)[0]} exits but test has "
                         f"{np.shape(test_conf)[0]}")
    num_exits = np.shape(calib_conf)[0]
    costs = _as_costs(costs, num_exits, exit_names)
    names = _names(exit_names, num_exits)
    shares = resolve_grid(grid, num_exits)
    policy = policy_columns(criterion, temperatures, names)
    rows = []
    for point, p in enumerate(shares):
        thresholds = find_thresholds(calib_conf, p)
        calib = evaluate_thresholds(calib_conf, calib_correct, thresholds, costs)
        test = evaluate_thresholds(test_conf, test_correct, thresholds, costs)
        row: dict[str, float | int] = {"point": point}
        row.update({f"target_share_{n}": float(v) for n, v in zip(names, p)})
        row.update({f"threshold_{n}": float(v) for n, v in zip(names, thresholds)})
        row.update(policy)
        row.update(calib_accuracy=calib.accuracy, calib_expected_cost=calib.expected_cost,
                   test_accuracy=test.accuracy, test_expected_cost=test.expected_cost)
        row.update({f"calib_share_{n}": float(v) for n, v in zip(names, calib.shares)})
        row.update({f"test_share_{n}": float(v) for n, v in zip(names, test.shares)})
        rows.append(row)
    return pd.DataFrame(rows)


def budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, costs,
                   grid: str | np.ndarray = DEFAULT_GRID, criterion: str = "max_softmax",
                   temperatures: str | Sequence[float] | np.ndarray | None = None,
                   exit_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Budgeted-batch curve: one row per operating point of ``grid`` (``"full"``, the default: every budget
    from the first exit to the last; ``"official"`` or ``"msdnet"``, the papers' grids; or a (points,
    exits) array of target shares), thresholds set on the calibration split and applied
    to the test split. Columns: see the module docstring.

    ``costs``: per-exit cost of a sample that stops there (cumulative, e.g. GMACs). ``temperatures``:
    None, one value per exit, or ``"fit"`` to fit them on the calibration split
    (:func:`fit_temperatures`); the fitted values are in ``df.attrs["temperatures"]``.
    """
    calib_logits, test_logits = _as_logits(calib_logits, "calib_logits"), _as_logits(test_logits, "test_logits")
    if calib_logits.shape[0] != test_logits.shape[0] or calib_logits.shape[2] != test_logits.shape[2]:
        raise ValueError(f"calib_logits {calib_logits.shape} and test_logits {test_logits.shape} must have "
                         "the same number of exits and classes")
    num_exits, _, num_classes = calib_logits.shape
    calib_targets = _as_targets(calib_targets, calib_logits.shape[1], num_classes, "calib_targets")
    test_targets = _as_targets(test_targets, test_logits.shape[1], num_classes, "test_targets")
    costs = _as_costs(costs, num_exits, exit_names)
    if isinstance(temperatures, str):
        if temperatures != "fit":
            raise ValueError(f"temperatures must be None, 'fit' or one value per exit, got {temperatures!r}")
        temperatures = fit_temperatures(calib_logits, calib_targets)
        log.info("fitted temperatures: %s", ", ".join(f"{t:.3f}" for t in temperatures))
    temperatures = _as_temperatures(temperatures, num_exits)
    calib_conf, calib_pred = scores(calib_logits, criterion, temperatures)
    test_conf, test_pred = scores(test_logits, criterion, temperatures)
    curve = curve_from_scores(calib_conf, calib_pred == calib_targets, test_conf, test_pred == test_targets,
                              costs, grid, exit_names, criterion, temperatures)
    curve.attrs.update(criterion=criterion,
                       temperatures=None if temperatures is None else temperatures.tolist())
    return curve


def anytime_accuracy(logits, targets, costs, exit_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Each exit on its own (anytime prediction): one row per exit with columns ``exit`` (name, or
    0-based index), ``cost`` and ``accuracy`` (percent)."""
    import pandas as pd

    arr = _as_logits(logits)
    num_exits, num_samples, num_classes = arr.shape
    y = _as_targets(targets, num_samples, num_classes)
    costs = _as_costs(costs, num_exits, exit_names)
    _, pred = scores(arr)
    accuracy = (pred == y).sum(axis=1) * 100.0 / num_samples
    return pd.DataFrame({"exit": _names(exit_names, num_exits), "cost": costs, "accuracy": accuracy})


# ---------------------------------------------------------------------------------------- policies

POLICY_FORMAT = "dynexit-exit-policy"  # the "format" field of a saved policy
POLICY_VERSION = 1
_POLICY_FIELDS = ("exit_names", "criterion", "temperatures", "thresholds")


@dataclass(frozen=True)
class ExitPolicy:
    """A complete early-exit rule, the argument of :func:`dynexit.inference.early_exit`: a sample leaves at the
    first exit whose ``criterion`` confidence (at ``temperatures``, one per exit, or None) is >= that exit's
    threshold; the last exit takes everyone left, so its threshold must be ``ALWAYS`` (-1e8) or lower.

    Every row of a curve (:func:`budgeted_curve`, ``dynexit curve``, ``dynexit search thresholds``, a run's
    curve.csv) is one: see :meth:`from_curve`. :meth:`save` / :meth:`load` keep it as JSON. Validated on
    construction: a ValueError or TypeError names the field.
    """

    exit_names: tuple[str, ...]
    criterion: str
    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...] | None = None

    def __post_init__(self):
        names = self.exit_names
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise TypeError(f"exit_names: need a non-empty list of exit names, got {names!r}")
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"exit_names: need distinct non-empty strings, got {list(names)!r}")
        object.__setattr__(self, "exit_names", tuple(names))
        if not isinstance(self.criterion, str) or self.criterion not in CRITERIA:
            raise ValueError(f"criterion: unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        object.__setattr__(self, "thresholds", self._numbers("thresholds", self.thresholds))
        if any(np.isnan(t) for t in self.thresholds):
            raise ValueError(f"thresholds: must not be NaN, got {list(self.thresholds)}")
        if self.thresholds[-1] > ALWAYS:
            raise ValueError(f"thresholds: the last exit ({names[-1]!r}) takes everyone left, so its threshold "
                             f"must be {float(ALWAYS):g} (ALWAYS) or lower, got {self.thresholds[-1]!r}")
        if self.temperatures is not None:
            temps = self._numbers("temperatures", self.temperatures)
            if not all(np.isfinite(t) and t > 0 for t in temps):
                raise ValueError(f"temperatures: must be finite and positive, got {list(temps)}")
            object.__setattr__(self, "temperatures", temps)

    def _numbers(self, field: str, values) -> tuple[float, ...]:
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
            raise TypeError(f"{field}: need one number per exit, got {values!r}")
        if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                   for v in values):
            raise TypeError(f"{field}: need numbers, got {list(values)!r}")
        if len(values) != len(self.exit_names):
            raise ValueError(f"{field}: need one per exit ({len(self.exit_names)}: "
                             f"{', '.join(self.exit_names)}), got {len(values)}")
        return tuple(float(v) for v in values)

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    # ---------------------------------------------------------------------------------- from curves

    @classmethod
    def from_curve(cls, curve, budget: float | None = None, point: int | None = None,
                   run_id: str | None = None) -> ExitPolicy:
        """The policy of one row of a curve (a CSV path or a DataFrame with ``threshold_<exit>`` columns).

        ``budget=B``: the row with the highest CALIBRATION accuracy among those whose CALIBRATION expected
        cost (``calib_expected_cost``) is <= B; ties go to the lower calibration cost, then the earlier row.
        Calibration figures, because thresholds are chosen on calibration data only: the test columns are the
        held-out estimate of how the chosen policy does, and choosing by them would make it optimistic.
        ``point=i``: the row whose ``point`` is i (the row at position i when there is no ``point`` column).
        ``run_id``: the run to take the row from, in an experiment's curves.csv (needed when it holds several).

        Curves written before the criterion and temperatures were recorded load as ``max_softmax`` without
        temperature (what those curves used by default).
        """
        import pandas as pd

        from dynexit.utils import read_csv_file

        if (budget is None) == (point is None):
            raise ValueError("give exactly one of budget= and point=")
        where = "curve"
        if isinstance(curve, pd.DataFrame):
            frame = curve
        else:
            where = str(curve)
            frame = read_csv_file(curve, "curve file")  # pandas reads floats back bit for bit
        frame = _one_run(frame, run_id, where)
        names = [c[len("threshold_"):] for c in frame.columns
                 if c.startswith("threshold_") and frame[c].notna().any()]
        if not names:
            raise ValueError(f"{where}: no threshold_<exit> columns: not a curve of exit thresholds")
        if budget is not None:
            row = _row_within_budget(frame, float(budget), where)
        else:
            row = _row_at_point(frame, point, where)
        label = f"{where}, point {row.get('point', row.name)}"
        criterion = "max_softmax"
        if "criterion" in frame.columns and pd.notna(row["criterion"]):
            criterion = str(row["criterion"])
        else:
            log.info("%s has no criterion column: max_softmax, no temperature (a curve of an earlier version)", where)
        temps = [row.get(f"temperature_{n}", np.nan) for n in names]
        given = [pd.notna(t) for t in temps]
        if any(given) and not all(given):
            raise ValueError(f"{label}: temperatures given for some exits only: "
                             f"{', '.join(f'{n}={t}' for n, t in zip(names, temps))}")
        try:
            return cls(tuple(names), criterion, tuple(float(row[f"threshold_{n}"]) for n in names),
                       tuple(float(t) for t in temps) if all(given) else None)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{label}: {err}") from None

    # ------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "exit_names": list(self.exit_names),
                "criterion": self.criterion,
                "temperatures": None if self.temperatures is None else list(self.temperatures),
                "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data, where: str = "policy") -> ExitPolicy:
        """The policy of :meth:`to_dict`'s mapping; errors name ``where`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: need a JSON object with fields {', '.join(_POLICY_FIELDS)}, "
                             f"got {type(data).__name__}")
        if data.get("format") != POLICY_FORMAT:
            raise ValueError(f"{where}: field 'format' must be {POLICY_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != POLICY_VERSION:
            raise ValueError(f"{where}: field 'version' must be {POLICY_VERSION}, got {data.get('version')!r}")
        unknown = sorted(set(data) - set(_POLICY_FIELDS) - {"format", "version"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(_POLICY_FIELDS)}")
        missing = [f for f in ("exit_names", "criterion", "thresholds") if f not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
        try:
            return cls(data["exit_names"], data["criterion"], data["thresholds"], data.get("temperatures"))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: field {err}") from None

    def save(self, path) -> None:
        """Writes the policy as JSON, atomically (a reader never sees half a file)."""
        import json

        from dynexit.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> ExitPolicy:
        """Reads a policy written by :meth:`save`; a missing, malformed or invalid file is an error naming it."""
        from dynexit.utils import read_json_file

        return cls.from_dict(read_json_file(path, "exit policy file"), str(path))


def _one_run(frame: pd.DataFrame, run_id: str | None, where: str) -> pd.DataFrame:
    if "run_id" in frame.columns:
        ids = [str(r) for r in frame["run_id"].unique()]
        if run_id is not None:
            if str(run_id) not in ids:
                raise ValueError(f"{where}: no run {run_id!r}; runs: {', '.join(ids)}")
            return frame[frame["run_id"].astype(str) == str(run_id)]
        if len(ids) > 1:
            raise ValueError(f"{where} holds the curves of {len(ids)} runs; choose one with run_id= "
                             f"({', '.join(ids)})")
    elif run_id is not None:
        raise ValueError(f"{where} has no run_id column: it is the curve of one run")
    if frame.empty:
        raise ValueError(f"{where}: the curve has no rows")
    return frame


def _row_within_budget(frame: pd.DataFrame, budget: float, where: str) -> pd.Series:
    for column in ("calib_accuracy", "calib_expected_cost"):
        if column not in frame.columns:
            raise ValueError(f"{where}: no {column!r} column, needed to choose a row by budget")
    if not np.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget}")
    within = frame[frame["calib_expected_cost"] <= budget]
    if within.empty:
        raise ValueError(f"{where}: no operating point within budget {budget:g}: the cheapest costs "
                         f"{frame['calib_expected_cost'].min():g} on the calibration split")
    order = within.assign(_position=np.arange(len(within)))
    order = order.sort_values(["calib_accuracy", "calib_expected_cost", "_position"],
                              ascending=[False, True, True], kind="stable")
    return within.iloc[int(order["_position"].iloc[0])]


def _row_at_point(frame: pd.DataFrame, point: int, where: str) -> pd.Series:
    if "point" in frame.columns:
        rows = frame[frame["point"] == point]
        if rows.empty:
            raise ValueError(f"{where}: no point {point}; points: {frame['point'].min()}..{frame['point'].max()}")
        return rows.iloc[0]
    if not 0 <= point < len(frame):
        raise ValueError(f"{where}: no point {point}; the curve has {len(frame)} rows")
    return frame.iloc[point]
