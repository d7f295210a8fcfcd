"""Confidence criteria (the one implementation of exit scoring, for the simulated policy and real early exit)
and temperature scaling."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dynexit.policies.checks import as_logits, as_targets, as_temperatures

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CRITERIA = ("max_softmax", "entropy", "margin")  # the confidence criteria, in the order --help lists them
_CHUNK = 8192  # samples per softmax call: bounds the temporary memory on ImageNet-sized arrays


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


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
    arr = as_logits(logits)
    num_exits, num_samples, _ = arr.shape
    temps = as_temperatures(temperature, num_exits)
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
    arr = as_logits(logits)
    num_exits, num_samples, num_classes = arr.shape
    y = as_targets(targets, num_samples, num_classes)
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
