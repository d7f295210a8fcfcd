"""Real early exit.

:func:`early_exit` runs a model segment by segment and stops each sample at its first confident exit,
so it computes only what each sample needs: with a batch of one it returns at the first confident
exit; with a larger batch it drops the samples that have left (``State.select``) before running the
next segment and goes on with the rest. Its decisions are those of the simulated policy of
:mod:`dynexit.policies` on the logits of all exits: the same confidence criteria, computed the same
way (:func:`dynexit.policies.exit_scores`, the one scoring code), and the same rule (a sample leaves at
the first exit whose confidence is >= its threshold, compared in float64; the last exit takes everyone
left).
Latency measurement (``dynexit bench``) lives in :mod:`dynexit.timing`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dynexit.models.base import MultiExitModel
from dynexit.models.interface import check_multi_exit_model
from dynexit.models.state import logits_of, select
from dynexit.policies import ExitPolicy, check_criterion, exit_scores
from dynexit.utils import eval_mode

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
    with eval_mode(model):
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
    return predictions, exits


def run_to_exit(model: MultiExitModel, x: torch.Tensor, k: int) -> torch.Tensor:
    """Logits of exit ``k`` of every sample, running segments 0..k (the work of reaching exit k)."""
    check_multi_exit_model(model, need_segments=True, purpose="running segments")
    s = model.init_state(x)
    for j in range(k + 1):
        s = model.run_segment(j, s)
    return logits_of(s)[-1]
