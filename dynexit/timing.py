"""Latency measurement of multi-exit models (``dynexit bench``, the latency report): timings run under
``torch.inference_mode`` in eval mode and report medians; several functions timed together are interleaved
(one call of each in turn), so that load from other work on the machine hits all of them alike. Operating
points time real early exit at a budgeted policy.
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

from dynexit.inference import check_policy_fits, early_exit, run_to_exit
from dynexit.models.base import MultiExitModel
from dynexit.policies import ExitPolicy, confidence, find_thresholds
from dynexit.utils import eval_mode

log = logging.getLogger(__name__)


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


def exit_latencies(model: MultiExitModel, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> list[Timing]:
    """Latency of reaching each exit (segments 0..k on the batch ``x``), in exit order; the last one is
    the full model. Eval mode (restored after), interleaved timings."""
    with eval_mode(model):
        fns = {str(k): (lambda k=k: run_to_exit(model, x, k)) for k in range(len(model.exit_names))}
        timings = time_calls(fns, repeats, warmup, x.device)
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
    with eval_mode(model):
        with torch.inference_mode():
            chunks = [torch.stack(model(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
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
    with eval_mode(model):
        timings = time_calls({
            "full": lambda: [model(b) for b in batches],
            "early": lambda: [early_exit(model, b, policy) for b in batches],
        }, repeats, warmup, images.device)
    return OperatingPoint(tuple(float(s) for s in shares), policy.thresholds,
                          tuple(measured.tolist()), expected, timings["full"], timings["early"],
                          tuple(float(c) for c in costs))
