"""Real early exit, and latency measurement.

:func:`early_exit` runs a model segment by segment and stops each sample at its first confident exit,
so it computes only what each sample needs: with a batch of one it returns at the first confident
exit; with a larger batch it drops the samples that have left (``State.select``) before running the
next segment and goes on with the rest. Its decisions are those of the simulated policy of
:mod:`dynexit.policies` on the logits of all exits: the same confidence criteria, computed the same
way (:func:`dynexit.policies.exit_scores`, the one scoring code), and the same rule (a sample leaves at
the first exit whose confidence is >= its threshold, compared in float64; the last exit takes everyone
left).

The timing helpers run under ``torch.inference_mode`` in eval mode and report medians; several
functions timed together are interleaved (one call of each in turn), so that load from other work on
the machine hits all of them alike.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dynexit.models.base import MultiExitModel
from dynexit.models.interface import check_multi_exit_model
from dynexit.models.state import logits_of, select
from dynexit.policies import ExitPolicy, check_criterion, confidence, exit_scores, find_thresholds

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- arguments

def _thresholds(thresholds: Any, num_exits: int) -> list[float]:
    """One float per exit (the last one is never used); accepts ``num_exits`` or ``num_exits - 1``."""
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().cpu().numpy()
    arr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if len(arr) not in (num_exits, num_exits - 1):
        raise ValueError(f"thresholds has {len(arr)} values; the model has {num_exits} exits (give one per exit, "
                         "or one per exit but the last)")
    if np.isnan(arr[: num_exits - 1]).any():
        raise ValueError(f"thresholds must not be NaN, got {arr.tolist()}")
    return [float(v) for v in arr[: num_exits - 1]] + [float("-inf")]


def _temperatures(temperature: Any, num_exits: int) -> list[float | None]:
    if temperature is None:
        return [None] * num_exits
    arr = np.asarray(temperature, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, num_exits)
    if len(arr) != num_exits or not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(f"temperature must be one positive value or one per exit ({num_exits}), got {arr.tolist()}")
    return [float(t) for t in arr]


def check_policy_fits(policy: ExitPolicy, model: MultiExitModel) -> None:
    """A policy fits a model with as many exits, named alike (or numbered 0..K-1, as curves of unnamed
    logits are); else a ValueError naming both."""
    numbered = tuple(str(k) for k in range(len(model.exit_names)))
    if policy.exit_names not in (tuple(model.exit_names), numbered):
        raise ValueError(f"the policy's exits ({', '.join(policy.exit_names)}) are not the model's "
                         f"({', '.join(model.exit_names)})")


# -------------------------------------------------------------------------------------- early exit

def early_exit(model: MultiExitModel, x: torch.Tensor,
               thresholds: ExitPolicy | Sequence[float] | np.ndarray | torch.Tensor,
               criterion: str | None = None, temperature: float | Sequence[float] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifies ``x`` with early exit; returns ``(predictions, exits)``, int64 tensors with one entry
    per sample (exit indices in the model's exit order).

    ``thresholds``: an :class:`dynexit.policies.ExitPolicy` (which carries its criterion and temperatures;
    then ``criterion`` and ``temperature`` must not be given), or one threshold per exit (or per exit but the
    last) with ``criterion`` (default ``max_softmax``) and ``temperature``.
    A sample leaves at the first exit k whose confidence (``criterion``, see :func:`dynexit.policies.scores`) is
    >= ``thresholds[k]``; the last exit takes everyone left. Segment k runs only for the samples still
    undecided. Runs in eval mode (restored after) under ``torch.inference_mode``.
    """
    check_multi_exit_model(model, need_segments=True, purpose="early_exit")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if isinstance(thresholds, ExitPolicy):
        if criterion is not None or temperature is not None:
            raise ValueError("early_exit: an ExitPolicy carries its criterion and temperatures; do not pass "
                             "criterion= or temperature= with it")
        check_policy_fits(thresholds, model)
        thresholds, criterion, temperature = thresholds.thresholds, thresholds.criterion, thresholds.temperatures
    criterion = "max_softmax" if criterion is None else criterion
    check_criterion(criterion)
    num_exits = len(model.exit_names)
    limits = _thresholds(thresholds, num_exits)
    temps = _temperatures(temperature, num_exits)
    n = x.shape[0]
    predictions = torch.empty(n, dtype=torch.long, device=x.device)
    exits = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return predictions, exits
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            running = torch.arange(n, device=x.device)  # original positions of the samples still running
            s = model.init_state(x)
            for k in range(num_exits):
                s = model.run_segment(k, s)
                conf, pred = exit_scores(logits_of(s)[-1], criterion, temps[k])
                if k == num_exits - 1:
                    predictions[running] = pred
                    exits[running] = k
                    break
                done = conf.double() >= limits[k]
                leaving = int(done.sum())  # the one host-device sync per exit
                if leaving == 0:
                    continue
                predictions[running[done]] = pred[done]
                exits[running[done]] = k
                if leaving == len(done):
                    break
                keep = (~done).nonzero().squeeze(1)
                running = running[keep]
                s = select(s, keep)
    finally:
        model.train(was_training)
    return predictions, exits


# ------------------------------------------------------------------------------------------ timing

@dataclass(frozen=True)
class Timing:
    """Wall-clock times (seconds) of repeated calls."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how noisy the measurement was."""
        if len(self.times) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times, n=4)
        return (q3 - q1) / self.median


def reuse_freed_memory(limit: int = 1 << 30) -> bool:
    """Makes glibc's malloc keep freed blocks of up to ``limit`` bytes for reuse (process-wide).

    By default glibc serves large blocks with mmap and gives them back on free, so every large activation
    of a CPU forward is fresh memory whose pages fault in again on each run: a cost of the allocator, not of
    the model, that would be timed as the model's (tcmalloc or jemalloc avoid it too; figures in
    benchmarks/README.md). Call once, before timing. Returns False where it does not apply
    (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("malloc tuning skipped: no glibc mallopt")
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    ok = bool(mallopt(m_trim_threshold, ctypes.c_int(limit))) and bool(mallopt(m_mmap_threshold, ctypes.c_int(limit)))
    if not ok:
        log.info("malloc tuning refused by mallopt (limit %d bytes)", limit)
    return ok


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fns: Mapping[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3,
               device: torch.device | str | None = None) -> dict[str, Timing]:
    """Times every function of ``fns`` ``repeats`` times after ``warmup`` rounds, interleaved (each
    round calls each function once, in turn), under ``torch.inference_mode``. On a CUDA ``device``
    the GPU is synchronised around each call."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = torch.device(device) if device is not None else None
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, fn in fns.items():
                _sync(dev)
                start = time.perf_counter()
                fn()
                _sync(dev)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(t)) for name, t in times.items()}


def measure_latency(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3,
                    device: torch.device | str | None = None) -> Timing:
    """Latency of ``fn()``: see :func:`time_calls`."""
    return time_calls({"fn": fn}, repeats, warmup, device)["fn"]


def run_to_exit(model: MultiExitModel, x: torch.Tensor, k: int) -> torch.Tensor:
    """Logits of exit ``k`` of every sample, running segments 0..k (the work of reaching exit k)."""
    check_multi_exit_model(model, need_segments=True, purpose="running segments")
    s = model.init_state(x)
    for j in range(k + 1):
        s = model.run_segment(j, s)
    return logits_of(s)[-1]


def exit_latencies(model: MultiExitModel, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> list[Timing]:
    """Latency of reaching each exit (segments 0..k on the batch ``x``), in exit order; the last one is
    the full model. Eval mode (restored after), interleaved timings."""
    was_training = model.training
    model.eval()
    try:
        fns = {str(k): (lambda k=k: run_to_exit(model, x, k)) for k in range(len(model.exit_names))}
        timings = time_calls(fns, repeats, warmup, x.device)
    finally:
        model.train(was_training)
    return [timings[str(k)] for k in range(len(model.exit_names))]


# -------------------------------------------------------------------------------- operating points

@dataclass(frozen=True)
class OperatingPoint:
    """Early exit at one set of thresholds against the full model, on the same images.

    ``shares``: fraction of the images that left at each exit (measured); ``expected_gmacs``:
    sum of shares x per-exit cost; ``expected_gain``: full cost / expected cost; ``measured_gain``:
    full-model time / early-exit time (medians); ``efficiency``: measured / expected gain.
    """

    target_shares: tuple[float, ...]
    thresholds: tuple[float, ...]
    shares: tuple[float, ...]
    expected_gmacs: float
    full: Timing
    early: Timing
    costs: tuple[float, ...]

    @property
    def expected_gain(self) -> float:
        return self.costs[-1] / self.expected_gmacs

    @property
    def measured_gain(self) -> float:
        return self.full.median / self.early.median

    @property
    def efficiency(self) -> float:
        return self.measured_gain / self.expected_gain


def thresholds_for_shares(model: MultiExitModel, images: torch.Tensor, shares: Sequence[float],
                          criterion: str = "max_softmax", batch_size: int = 64) -> np.ndarray:
    """Thresholds that send the given ``shares`` of ``images`` out at each exit: the budgeted protocol
    (``policies.find_thresholds``) on these images' own confidences."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [torch.stack(model(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    logits = torch.cat(chunks, dim=1).float().cpu().numpy()
    return find_thresholds(confidence(logits, criterion), shares)


def operating_point(model: MultiExitModel, images: torch.Tensor, shares: Sequence[float], costs: Sequence[float],
                    batch_size: int, repeats: int = 10, warmup: int = 2,
                    criterion: str = "max_softmax") -> OperatingPoint:
    """Times early exit on ``images`` (in batches of ``batch_size``) at the thresholds that send
    ``shares`` of them out at each exit (:func:`thresholds_for_shares`), against the full model on the
    same batches; ``costs`` are the cumulative per-exit costs (GMACs) for the expected figures."""
    if len(shares) != len(model.exit_names) or len(costs) != len(model.exit_names):
        raise ValueError(f"need one share and one cost per exit ({len(model.exit_names)}), got {len(shares)} shares "
                         f"and {len(costs)} costs")
    thresholds = thresholds_for_shares(model, images, shares, criterion, batch_size)
    policy = ExitPolicy(tuple(model.exit_names), criterion, tuple(float(t) for t in thresholds))
    return _time_policy(model, images, policy, costs, batch_size, repeats, warmup, shares)


def policy_point(model: MultiExitModel, images: torch.Tensor, policy: ExitPolicy, costs: Sequence[float],
                 batch_size: int, repeats: int = 10, warmup: int = 2) -> OperatingPoint:
    """Times early exit with ``policy`` (e.g. a curve's operating point, :meth:`ExitPolicy.from_curve`) on
    ``images`` in batches of ``batch_size``, against the full model on the same batches; ``target_shares``
    is empty (the policy fixes thresholds, not shares) and ``shares`` are those measured on these images."""
    check_policy_fits(policy, model)
    if len(costs) != len(model.exit_names):
        raise ValueError(f"need one cost per exit ({len(model.exit_names)}), got {len(costs)}")
    return _time_policy(model, images, policy, costs, batch_size, repeats, warmup, ())


def _time_policy(model: MultiExitModel, images: torch.Tensor, policy: ExitPolicy, costs: Sequence[float],
                 batch_size: int, repeats: int, warmup: int, shares: Sequence[float]) -> OperatingPoint:
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    exits = torch.cat([early_exit(model, b, policy)[1] for b in batches]).cpu()
    measured = torch.bincount(exits, minlength=len(model.exit_names)).double() / len(exits)
    expected = float(sum(s * c for s, c in zip(measured.tolist(), costs)))
    was_training = model.training
    model.eval()
    try:
        timings = time_calls({
            "full": lambda: [model(b) for b in batches],
            "early": lambda: [early_exit(model, b, policy) for b in batches],
        }, repeats, warmup, images.device)
    finally:
        model.train(was_training)
    return OperatingPoint(tuple(float(s) for s in shares), policy.thresholds,
                          tuple(measured.tolist()), expected, timings["full"], timings["early"],
                          tuple(float(c) for c in costs))
