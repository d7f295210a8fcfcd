"""Per-exit logits of a data set, and their ``.npz`` files.

A logits file holds ``logits`` (exits, samples, classes) float32 and ``targets`` (samples,) int64,
exits in the model's exit order.
"""
from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dynexit.utils import atomic_write, eval_mode

log = logging.getLogger(__name__)

FIELDS = ("logits", "targets")


def collect_logits(model: torch.nn.Module, loader: Iterable, device: str | torch.device = "cpu"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``model`` in eval mode under ``torch.inference_mode`` over ``loader`` (batches of
    ``(images, targets)``) and returns ``(logits, targets)``: float32 (exits, samples, classes) and
    int64 (samples,), in loader order. The model's train/eval mode is restored afterwards."""
    per_exit: list[list[np.ndarray]] = []
    targets: list[np.ndarray] = []
    with eval_mode(model), torch.inference_mode():
        for batch in tqdm(loader, desc="logits", disable=None, leave=False):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("the loader must yield (images, targets) batches")
            images, target = batch[0], batch[1]
            outputs = model(images.to(device, non_blocking=True))
            if isinstance(outputs, torch.Tensor):  # a single-exit model
                outputs = [outputs]
            if not per_exit:
                per_exit = [[] for _ in outputs]
            if len(outputs) != len(per_exit):
                raise ValueError(f"the model returned {len(outputs)} exits, then {len(per_exit)}")
            for store, out in zip(per_exit, outputs):
                store.append(out.float().cpu().numpy())
            targets.append(torch.as_tensor(target).cpu().numpy().astype(np.int64, copy=False))
    if not targets:
        raise ValueError("the loader yielded no batches")
    exits = [np.concatenate(store) for store in per_exit]
    classes = {e.shape[1:] for e in exits}
    if len(classes) != 1:
        shapes = ", ".join(f"exit {k}: {e.shape[1:]}" for k, e in enumerate(exits))
        raise ValueError(f"the exits return logits of different shapes ({shapes})")
    logits = np.stack(exits)
    log.debug("collected logits %s", logits.shape)
    return logits, np.concatenate(targets)


def _validate(logits: np.ndarray, targets: np.ndarray, where: str) -> None:
    if logits.ndim != 3 or 0 in logits.shape:
        raise ValueError(f"{where}: 'logits' must have shape (exits, samples, classes), got {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"{where}: 'logits' must be floating point, got {logits.dtype}")
    if targets.ndim != 1:
        raise ValueError(f"{where}: 'targets' must have shape (samples,), got {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"{where}: 'targets' must be integer class indices, got {targets.dtype}")
    if len(targets) != logits.shape[1]:
        raise ValueError(f"{where}: 'logits' has {logits.shape[1]} samples but 'targets' has {len(targets)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= logits.shape[2]):
        raise ValueError(f"{where}: 'targets' holds class indices outside [0, {logits.shape[2]})")


def save_logits(path: str | Path, logits: np.ndarray, targets: np.ndarray) -> None:
    """Writes ``logits`` (as float32) and ``targets`` (as int64) to the ``.npz`` file ``path``
    atomically."""
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets)
    _validate(logits, targets, str(path))
    targets = targets.astype(np.int64, copy=False)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(fh, logits=logits, targets=targets)

    atomic_write(path, write)


def load_logits(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, targets)`` of a file written by :func:`save_logits`, checked for shape and type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"logits file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        fields, arrays = None, {}
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                fields = list(data.files)
                arrays = {name: data[name] for name in FIELDS if name in fields}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # truncated or damaged
        raise ValueError(f"cannot read {path} as an .npz logits file ({type(err).__name__}: {err}); it may be "
                         f"truncated or damaged: write it again") from None
    if fields is None:
        raise ValueError(f"{path} is a single array, not an .npz file with 'logits' and 'targets'")
    missing = [f for f in FIELDS if f not in arrays]
    if missing:
        raise ValueError(f"{path} has no field {missing[0]!r} (fields: {', '.join(fields) or 'none'})")
    logits, targets = arrays["logits"], arrays["targets"]
    _validate(logits, targets, str(path))
    return logits.astype(np.float32, copy=False), targets.astype(np.int64, copy=False)
