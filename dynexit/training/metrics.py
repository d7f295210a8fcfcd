"""Per-exit loss and accuracy: accumulated over batches, reduced across processes, logged per epoch.

Column names: ``{split}_loss_{exit}`` (mean cross-entropy) and ``{split}_acc_{exit}`` (top-1, percent),
with ``split`` one of ``train`` (running values over the epoch's training batches, in train mode, with
augmentation; accuracy against the unmixed labels), ``calib``, ``test``, and ``ema_calib``/``ema_test``
for the EMA weights. ``train_loss`` is the full training objective. A split not evaluated in an epoch
(``train.eval_every``, ``train.eval_calib``) has no value there (empty in metrics.csv).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dynexit.training.distributed import DistContext
from dynexit.utils import atomic_write, eval_mode, flatten_dict, read_csv_file

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
TB_FOLDER = "tb"  # TensorBoard's event files, in the run folder
RUN_TAG = "run"  # TensorBoard text: the run's readable name and its id


class ExitMetrics:
    """Sums of per-exit loss and correct predictions over samples, kept on the device (no sync per batch)."""

    def __init__(self, exit_names: Sequence[str], device: torch.device):
        self.exit_names = tuple(exit_names)
        k = len(self.exit_names)
        self.loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.correct = torch.zeros(k, dtype=torch.float64, device=device)
        self.objective_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: Sequence[torch.Tensor], labels: torch.Tensor, loss_per_exit: torch.Tensor,
               objective: Optional[torch.Tensor] = None) -> None:
        """``loss_per_exit``: (K,) batch means; ``labels``: class indices (B,)."""
        n = labels.shape[0]
        predictions = torch.stack([y.argmax(dim=-1) for y in logits])  # (K, B)
        self.correct += (predictions == labels).sum(dim=1).double()
        self.loss_sum += loss_per_exit.double() * n
        if objective is not None:
            self.objective_sum += objective.detach().double() * n
        self.count += n

    def running_loss(self) -> float:
        """This process's mean objective so far (the progress bar's; the host waits for the device)."""
        return float((self.objective_sum / self.count.clamp(min=1.0)).item())

    def state(self) -> dict[str, torch.Tensor]:
        """The sums so far (a mid-epoch checkpoint keeps them, on the CPU)."""
        return {key: getattr(self, key).detach().cpu() for key in ("loss_sum", "correct", "objective_sum", "count")}

    def load_state(self, state: dict[str, torch.Tensor]) -> ExitMetrics:
        for key, value in state.items():
            getattr(self, key).copy_(value)
        return self

    def reduce(self, ctx: DistContext) -> ExitMetrics:
        """The sums over all processes: one collective for all of them."""
        k = len(self.exit_names)
        flat = ctx.all_reduce(torch.cat([self.loss_sum, self.correct, self.objective_sum[None], self.count[None]]))
        self.loss_sum, self.correct = flat[:k], flat[k:2 * k]
        self.objective_sum, self.count = flat[2 * k], flat[2 * k + 1]
        return self

    def as_dict(self, prefix: str, objective: bool = False) -> dict[str, float]:
        """The means as numbers: one copy from the device."""
        k = len(self.exit_names)
        values = torch.cat([self.loss_sum, self.correct, self.objective_sum[None], self.count[None]]).tolist()
        n = max(values[2 * k + 1], 1.0)
        loss = [v / n for v in values[:k]]
        correct = [v * 100.0 / n for v in values[k:2 * k]]
        out = {f"{prefix}_loss": values[2 * k] / n} if objective else {}
        for name, exit_loss, exit_acc in zip(self.exit_names, loss, correct):
            out[f"{prefix}_loss_{name}"] = exit_loss
            out[f"{prefix}_acc_{name}"] = exit_acc
        return out


def prepare_images(images: torch.Tensor, device: torch.device, channels_last: bool,
                   to_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """A loader's batch on ``device``, finished there by ``to_input`` (uint8 -> normalized float; see
    ``dynexit.data.Splits.train_input``) if given, in channels-last layout if asked."""
    images = images.to(device, non_blocking=True)
    if to_input is not None:
        images = to_input(images)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def autocast(device: torch.device, amp):
    """Autocast on CUDA as ``train.amp`` says (bf16 or fp16; true is bf16); a no-op elsewhere."""
    from dynexit.config import amp_mode

    mode = amp_mode(amp)
    if mode and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if mode == "bf16" else torch.float16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, exit_names: Sequence[str], ctx: DistContext,
             amp: bool = False, channels_last: bool = False) -> ExitMetrics:
    """Per-exit cross-entropy and accuracy of ``model`` (eval mode) over ``batches`` of (images, labels),
    summed over all processes (each process passes its own shard)."""
    metrics = ExitMetrics(exit_names, ctx.device)
    with eval_mode(model):  # restored even when a batch fails
        for images, labels in batches:
            images = prepare_images(images, ctx.device, channels_last)
            labels = labels.to(ctx.device, non_blocking=True)
            with autocast(ctx.device, amp):
                logits = model(images)
            logits = [y.float() for y in logits]
            loss = torch.stack([F.cross_entropy(y, labels) for y in logits])
            metrics.update(logits, labels, loss)
    return metrics.reduce(ctx)


class MetricsLog:
    """Appends one row per epoch to ``metrics.csv`` (rewritten atomically) and to TensorBoard (``tb/``).

    Only the main process writes; others hold a disabled log. ``truncate(epoch)`` drops rows past a
    resumed checkpoint's epoch (written before a crash that came ahead of the checkpoint).
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_epoch: int = 0,
                 run_name: Optional[str] = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed session logged after the checkpoint it resumes from.
            self.writer = SummaryWriter(str(Path(run_dir) / TB_FOLDER),
                                        purge_step=start_epoch + 1 if start_epoch else None)
            if not start_epoch:  # once per run: the readable name and the run id
                text = f"{run_name} (run id {Path(run_dir).name})" if run_name else f"run id {Path(run_dir).name}"
                self.writer.add_text(RUN_TAG, text, 0)

    def rows(self) -> pd.DataFrame:
        return read_csv_file(self.path, "metrics file") if self.path.is_file() else pd.DataFrame()

    def truncate(self, epoch: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        rows = self.rows()
        if "epoch" in rows and (rows["epoch"] > epoch).any():
            kept = rows[rows["epoch"] <= epoch]
            atomic_write(self.path, lambda tmp: kept.to_csv(tmp, index=False))

    def append(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        old = self.rows()
        table = pd.DataFrame([row]) if old.empty else pd.concat([old, pd.DataFrame([row])], ignore_index=True)
        atomic_write(self.path, lambda tmp: table.to_csv(tmp, index=False))
        if self.writer is not None:
            epoch = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and value == value:  # skip NaN (epochs without evaluation)
                    self.writer.add_scalar(_tb_tag(key), value, epoch)
            self.writer.flush()

    def add_hparams(self, config: dict, final: dict[str, float]) -> None:
        """The run's flattened configuration (``model.name``, ``train.lr``, ...) and its final metrics in
        TensorBoard's HParams tab; the metrics point at the scalar tags already logged."""
        if self.writer is None or not final:
            return
        from torch.utils.tensorboard.summary import hparams

        params = {key: _hparam_value(value) for key, value in flatten_dict(config).items()}
        metrics = {_tb_tag(key): float(value) for key, value in final.items()
                   if key not in ("epoch", "step", "lr", "epoch_time") and value == value}
        for summary in hparams(params, metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tb_tag(key: str) -> str:
    """``test_acc_merge`` -> ``test/acc_merge`` (TensorBoard groups by the part before the slash)."""
    for split in ("ema_calib", "ema_test", "calib", "test", "train"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


def _hparam_value(value):
    """What the HParams tab can show: numbers, booleans and strings (lists and None as text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)
