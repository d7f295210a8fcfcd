"""The training loop: ``train(cfg, run_dir)`` trains one RunConfig into one run folder, resumably.

Run folder: ``config.yaml`` (the resolved config), ``checkpoint.pt`` (after every epoch, atomically;
see ``dynexit.training.state``), ``metrics.csv`` (one row per epoch, see ``dynexit.training.metrics``),
``tb/`` (TensorBoard), ``train_result.json`` (the TrainResult) and the data split's
``calib_indices.json`` (written by ``dynexit.data``).

Several processes (``torchrun --nproc_per_node=N -m dynexit train ...``) train one model with
DistributedDataParallel: each process reads its shard of every batch (DistributedSampler), so
``train.batch_size`` is per process; metrics are summed over processes and only rank 0 writes files.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dynexit.config import (
    RunConfig,
    amp_mode,
    build_configured_model,
    exit_loss_weights,
    save_yaml,
    to_container,
    uses_mixup,
    validate_train_config,
)
from dynexit.training.determinism import run_threads
from dynexit.training.distributed import DistContext, average_batchnorm_stats, setup
from dynexit.training.loss import MultiExitLoss
from dynexit.training.metrics import METRICS_FILE, ExitMetrics, MetricsLog, autocast, evaluate, prepare_images
from dynexit.training.optim import build_ema, build_optimizer, learning_rate, set_lr
from dynexit.training.progress_bar import show_progress_bar
from dynexit.training.state import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FORMAT,
    check_run_folder,
    restore_scaler,
    rng_state,
    scaler_state,
    seed_everything,
    set_rng_state,
)
from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
# Optimizer steps between the moments the training step waits for the device (the finiteness check, the
# progress bar, the clock of train.checkpoint_minutes); the epoch's end is always one.
LOG_EVERY = 50


@dataclass
class TrainResult:
    """What ``train`` returns (and writes to ``train_result.json``)."""

    run_dir: Path
    checkpoint: Path  # model, EMA (``load_model(path, ema=True)``), optimizer and RNG state of the last epoch
    metrics_csv: Path
    config_path: Path
    metrics: dict[str, float]  # the last epoch's row of metrics.csv
    epochs: int  # epochs completed
    steps: int  # optimizer steps taken
    wall_time: float  # seconds spent training and evaluating, summed over resumed sessions
    start_epoch: int  # epochs already done when this call started (0: a fresh run)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def train(cfg, run_dir: str | Path, device: str | torch.device | None = None, resume: bool = True, *,
          on_epoch_end: Optional[Callable[..., Any]] = None, run_name: Optional[str] = None) -> TrainResult:
    """Trains the model of ``cfg`` (a ``dynexit.config.RunConfig``) into ``run_dir``.

    With ``resume`` (the default) a run folder holding a checkpoint of the same configuration continues
    from it and ends with exactly the weights of an uninterrupted run (a finished run returns at once);
    without it an existing checkpoint is a FileExistsError. A checkpoint or config.yaml of a different
    configuration is a ValueError naming the keys that differ. Nothing is written before the
    configuration, the model, the loss weights and the data have been checked.
    ``device``: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available. Training computes with
    ``train.threads`` CPU threads (deterministic algorithms on the CPU), restored on return. Under torchrun
    (``WORLD_SIZE`` > 1), or when the caller has initialised torch.distributed, every process calls this.
    A non-finite loss raises FloatingPointError naming the epoch and step; the last checkpoint is kept.
    ``on_epoch_end(epoch=, model=, ema=, metrics=)``, if given, is called on every process after each
    epoch's checkpoint (``ema``: the EMA model or None; ``metrics``: the epoch's row of metrics.csv), on a
    forked RNG so that it leaves training unchanged; an exception from it ends training (e.g. pruning).
    ``run_name`` (e.g. ``quickstart/full_seed0``) is written into TensorBoard as the ``run`` text with the
    run folder's name (the run id); the HParams tab gets the flattened configuration and final metrics.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"train() needs a dynexit.config.RunConfig, got {type(cfg).__name__}")
    validate_train_config(cfg.train)
    ctx = setup(device, timeout_min=cfg.train.dist_timeout_min)
    try:
        with run_threads(cfg.train.threads, deterministic_cpu=ctx.device.type == "cpu"):
            return _Session(cfg, Path(run_dir), ctx, resume, on_epoch_end, run_name).run()
    finally:
        ctx.close()


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Session:
    """One call of ``train``: setup, the epochs, the files."""

    def __init__(self, cfg, run_dir: Path, ctx: DistContext, resume: bool, on_epoch_end: Optional[Callable],
                 run_name: Optional[str] = None):
        self.cfg, self.tc, self.run_dir, self.ctx, self.resume = cfg, cfg.train, run_dir, ctx, resume
        self.run_name = run_name
        self.on_epoch_end = on_epoch_end
        self.ckpt_path = run_dir / CHECKPOINT_FILE
        self.checkpoint_epoch = 0  # the epochs and batches (of the next epoch) of the last checkpoint
        self.checkpoint_batch = 0
        self.within_epoch: Optional[dict] = None  # where a checkpoint written within an epoch left it
        self.last_row: dict[str, float] = {}  # the last finished epoch's row of metrics.csv
        self.last_save = time.monotonic()

    # ------------------------------------------------------------------ setup

    def run(self) -> TrainResult:
        cfg, tc, ctx = self.cfg, self.tc, self.ctx
        if tc.sync_bn and ctx.distributed and ctx.device.type != "cuda":
            raise ValueError(f"train.sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on "
                             f"{ctx.device.type}); on CPU use train.freeze_bn=true or neither")
        if amp_mode(tc.amp) and ctx.device.type != "cuda":
            log.warning("train.amp (%s autocast) applies on CUDA only; training in float32 on %s",
                        amp_mode(tc.amp), ctx.device)
        self.config = to_container(cfg)
        checkpoint = check_run_folder(self.run_dir, self.config, self.resume, "the given configuration")
        if checkpoint is not None and checkpoint["epoch"] >= tc.epochs:
            log.info("%s: already trained (%d epochs)", self.run_dir, checkpoint["epoch"])
            return self._finish(checkpoint["epoch"], checkpoint["step"], checkpoint["wall_time"],
                                checkpoint["metrics"], checkpoint["epoch"])
        configure_kernels(tc.deterministic, ctx.device.type)
        seed_everything(cfg.seed)
        self._build_model()
        self._build_data()
        if ctx.is_main:
            save_yaml(cfg, self.run_dir / CONFIG_FILE)
        tc = self.tc = scaled_recipe(tc, ctx.world_size)
        self.optimizer = build_optimizer(self.model, tc)
        self.ema = build_ema(self.model, tc)
        self.mixup = self._build_mixup()
        self.steps_per_epoch = math.ceil(len(self.loaders["train"]) / tc.accum_steps)
        # fp16 gradients underflow without loss scaling; bf16 and float32 need none (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_mode(tc.amp) == "fp16" and ctx.device.type == "cuda")
        start_epoch, step, wall_time = 0, 0, 0.0
        if checkpoint is not None:
            start_epoch, step, wall_time = self._restore(checkpoint)
        elif ctx.rank:
            seed_everything(cfg.seed + ctx.rank)  # own augmentation/mixup streams per process
        self.checkpoint_epoch = start_epoch
        # Compiled first, then wrapped (as timm): DDP's gradient hooks stay outside the compiled graph, and
        # no_sync() is DDP's own. The checkpoint and evaluation keep using the eager self.model (same parameters).
        self.net = self._wrap(torch.compile(self.model) if tc.compile else self.model)
        return self._epochs(start_epoch, step, wall_time)

    def _build_model(self) -> None:
        tc, ctx = self.tc, self.ctx
        model = build_configured_model(self.cfg.model)  # a preset of any family, or a factory's model
        self.exit_names = tuple(model.exit_names)
        weights = exit_loss_weights(self.exit_names, tc.loss_weights)  # default: 1.0 per exit unless Perceiver
        self.loss_fn = MultiExitLoss(self.exit_names, weights, distill_alpha=tc.distill_alpha,
                                     temperature=tc.distill_temperature,
                                     label_smoothing=tc.label_smoothing).to(ctx.device)  # its weights too
        if tc.sync_bn and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(ctx.device)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model

    def _build_data(self) -> None:
        from dynexit.data import build_datasets, build_loaders
        from dynexit.data.loaders import loader_workers

        cfg, ctx = self.cfg, self.ctx
        splits = None
        if ctx.is_main:  # the main process draws and saves the calibration split; the others read it
            splits = build_datasets(cfg.data, self.run_dir, uint8_train=True)
        ctx.barrier()
        if splits is None:
            splits = build_datasets(cfg.data, self.run_dir, uint8_train=True)
        self.to_input = splits.train_input  # training batches: uint8 through the loader, normalized on the device
        from dynexit.models.interface import model_setting

        classes = model_setting(self.model, "num_classes")
        if classes is not None and splits.num_classes != classes:
            raise ValueError(f"model.num_classes is {classes}, but data set {splits.name!r} has "
                             f"{splits.num_classes} classes; set model.num_classes={splits.num_classes}")
        size = model_setting(self.model, "input_size")
        if size is not None and size != splits.image_size:
            log.warning("model.input_size=%d differs from data.image_size=%d; training at %d px",
                        size, splits.image_size, splits.image_size)
        self.num_classes = splits.num_classes
        eval_bs = self.tc.eval_batch_size or 2 * self.tc.batch_size
        pin = ctx.device.type == "cuda"
        workers = loader_workers(cfg.data.num_workers)  # within this process's CPUs: the same images, fewer workers
        self.loaders = build_loaders(splits, self.tc.batch_size, num_workers=workers,
                                     distributed=ctx.distributed, seed=cfg.seed, eval_batch_size=eval_bs,
                                     pin_memory=pin)
        if ctx.distributed:  # each process evaluates every world_size-th sample; sums are reduced
            for name in ("calib", "test"):
                dataset = getattr(splits, name)
                shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
                self.loaders[name] = DataLoader(shard, batch_size=eval_bs, shuffle=False, num_workers=workers,
                                                pin_memory=pin, persistent_workers=workers > 0)

    def _build_mixup(self):
        if not uses_mixup(self.tc):
            return None
        from timm.data import Mixup

        tc = self.tc
        return Mixup(mixup_alpha=tc.mixup, cutmix_alpha=tc.cutmix, prob=tc.mixup_prob,
                     switch_prob=tc.mixup_switch_prob, mode=tc.mixup_mode, label_smoothing=tc.label_smoothing,
                     num_classes=self.num_classes)

    def _restore(self, checkpoint: dict) -> tuple[int, int, float]:
        """The training state of ``checkpoint``; one written within an epoch also leaves the batch to go on
        from, which the next epoch starts at (``self.within_epoch``)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
        restore_scaler(self.scaler, checkpoint)
        epoch = int(checkpoint["epoch"])
        self.last_row = dict(checkpoint["metrics"])
        rngs = checkpoint["rng"]
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank], self.loaders["train"].generator)
            if checkpoint.get("batch"):
                self.within_epoch = {key: checkpoint[key] for key in ("batch", "train_metrics", "epoch_time")}
                self.checkpoint_batch = int(checkpoint["batch"])
                log.info("resuming %s within epoch %d, after %d batches", self.run_dir, int(checkpoint["epoch"]) + 1,
                         int(checkpoint["batch"]))
        else:  # a checkpoint written within an epoch restarts that epoch: its batches were sharded otherwise
            log.warning("checkpoint written by %d processes, resuming with %d: data order and augmentation "
                        "of the remaining epochs differ from an uninterrupted run", len(rngs), self.ctx.world_size)
            seed_everything(self.cfg.seed + 7919 * epoch + self.ctx.rank)
        log.info("resuming %s after epoch %d", self.run_dir, epoch)
        return epoch, int(checkpoint["step"]), float(checkpoint["wall_time"])

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # ------------------------------------------------------------------ epochs

    def _epochs(self, start_epoch: int, step: int, wall_time: float) -> TrainResult:
        tc, ctx = self.tc, self.ctx
        history = MetricsLog(self.run_dir, ctx.is_main, tc.tensorboard, start_epoch, run_name=self.run_name)
        history.truncate(start_epoch)
        row: dict[str, float] = {}
        try:
            for epoch in range(start_epoch + 1, tc.epochs + 1):
                self.epoch_start, self.wall_before = time.perf_counter(), wall_time
                train_metrics, step, lr = self._train_epoch(epoch, step)
                row = {"epoch": epoch, "step": step, "lr": lr, **train_metrics}
                if epoch % tc.eval_every == 0 or epoch == tc.epochs:
                    row.update(self._evaluate(last=epoch == tc.epochs))
                row["epoch_time"] = self._epoch_seconds()
                wall_time += row["epoch_time"]
                rngs = ctx.gather(rng_state(self.loaders["train"].generator))
                if ctx.is_main:
                    history.append(row)
                    self._save(epoch, step, rngs, row, wall_time)
                    log.info("epoch %d/%d: %s", epoch, tc.epochs, _summary(row, self.exit_names))
                self.last_row, self.last_save = row, time.monotonic()
                self.checkpoint_epoch, self.checkpoint_batch = epoch, 0
                if self.on_epoch_end is not None:
                    with torch.random.fork_rng(devices=self._cuda_indices()):
                        self.on_epoch_end(epoch=epoch, model=self.model, metrics=dict(row),
                                          ema=self.ema.module if self.ema is not None else None)
            history.add_hparams(self.config, row)
        finally:
            history.close()
        return self._finish(tc.epochs, step, wall_time, row, start_epoch)

    def _train_epoch(self, epoch: int, step: int) -> tuple[dict[str, float], int, float]:
        """One epoch (from the batch a checkpoint written within it left, if any). The host waits for the
        device only every ``LOG_EVERY`` optimizer steps and at the epoch's end: losses, accuracies and the
        finiteness of the loss accumulate on the device in between."""
        tc, ctx = self.tc, self.ctx
        loader = self.loaders["train"]
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.epoch_loader_state = loader.generator.get_state()  # a checkpoint within the epoch starts it again
        metrics = ExitMetrics(self.exit_names, ctx.device)
        start, self.epoch_time_before = 0, 0.0
        if self.within_epoch is not None:
            resume = self.within_epoch
            start, self.epoch_time_before = int(resume["batch"]), float(resume["epoch_time"])
            metrics.load_state(resume["train_metrics"][ctx.rank])
            sampler.skip = start * loader.batch_size  # skipped without loading them
            self.within_epoch = None
        self.net.train()
        if tc.freeze_bn:
            _freeze_batchnorm(self.model)
        first_bad = torch.full((), -1, dtype=torch.int64, device=ctx.device)  # first micro-batch with a bad loss
        n = len(loader)
        show = show_progress_bar(tc.progress, ctx.is_main)
        bar = tqdm(total=n, initial=start, desc=f"epoch {epoch}/{tc.epochs}", disable=not show, leave=False,
                   dynamic_ncols=True)
        lr = learning_rate(tc, step, self.steps_per_epoch)
        for i, (images, labels) in enumerate(loader, start):
            images = prepare_images(images, ctx.device, tc.channels_last, self.to_input)
            labels = labels.to(ctx.device, non_blocking=True)
            targets = labels
            if self.mixup is not None and images.shape[0] % 2 == 0:  # timm mixes a batch with its mirror
                images, targets = self.mixup(images, labels)
            first = (i // tc.accum_steps) * tc.accum_steps
            group = min(tc.accum_steps, n - first)  # micro-batches in this optimizer step
            boundary = i - first == group - 1
            no_sync = self.net.no_sync() if (ctx.distributed and not boundary) else nullcontext()
            with no_sync:
                with autocast(ctx.device, tc.amp):
                    logits = self.net(images)
                out = self.loss_fn(logits, targets)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(out.total.detach()), i, first_bad)
                self.scaler.scale(out.total / group).backward()
            metrics.update(logits, labels, out.per_exit, out.total)
            if boundary:
                lr = learning_rate(tc, step, self.steps_per_epoch)
                set_lr(self.optimizer, lr)
                if tc.clip_grad is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                if self.ema is not None:
                    self.ema.update(self.model, step)
            bar.update(1)
            if boundary and (step % LOG_EVERY == 0 or i == n - 1):  # the host waits for the device here only
                self._check_finite(first_bad, epoch, n, step)
                if show:
                    bar.set_postfix(loss=f"{metrics.running_loss():.3f}", lr=f"{lr:.2e}")
                if i < n - 1 and self._checkpoint_due():
                    self._save_within_epoch(epoch, step, i + 1, metrics)
        bar.close()
        return metrics.reduce(ctx).as_dict("train", objective=True), step, lr

    def _check_finite(self, first_bad: torch.Tensor, epoch: int, n: int, step: int) -> None:
        """Raises FloatingPointError on every process if any process had a non-finite loss since the epoch
        began (before anything of those steps is saved: the last checkpoint is kept)."""
        bad = self.ctx.all_reduce((first_bad >= 0).to(torch.int32), op="max")
        if not bad.item():  # every process stops together
            return
        within = f" and {self.checkpoint_batch} batches of the next" if self.checkpoint_batch else ""
        kept = (f"the last good checkpoint {self.ckpt_path} (epoch {self.checkpoint_epoch}{within}) is kept"
                if self.checkpoint_epoch or self.checkpoint_batch else "no checkpoint had been written yet")
        index = int(first_bad.item())
        where = f"step {index + 1} of {n}" if index >= 0 else "another process's batch"
        raise FloatingPointError(f"non-finite training loss at epoch {epoch}, {where} (before optimizer step "
                                 f"{step + 1}); training stopped, {kept}")

    def _checkpoint_due(self) -> bool:
        """Whether ``train.checkpoint_minutes`` have passed since the last checkpoint (rank 0's clock decides
        for every process)."""
        minutes = self.tc.checkpoint_minutes
        if minutes is None:
            return False
        return self.ctx.broadcast_flag(time.monotonic() - self.last_save >= 60.0 * minutes)

    def _epoch_seconds(self) -> float:
        return self.epoch_time_before + time.perf_counter() - self.epoch_start

    def _save_within_epoch(self, epoch: int, step: int, batch: int, metrics: ExitMetrics) -> None:
        """A checkpoint after ``batch`` micro-batches of ``epoch`` (at an optimizer step): a requeued job goes
        on from there, exactly as if it had not stopped."""
        state = rng_state()
        state["loader"] = self.epoch_loader_state
        rngs = self.ctx.gather(state)
        sums = self.ctx.gather(metrics.state())  # each process's own sums, reduced at the epoch's end
        if self.ctx.is_main:
            seconds = self._epoch_seconds()
            self._save(epoch - 1, step, rngs, self.last_row, self.wall_before + seconds, batch=batch,
                       train_metrics=sums, epoch_time=seconds)
            log.info("checkpoint within epoch %d, after %d of %d batches", epoch, batch,
                     len(self.loaders["train"]))
        self.last_save, self.checkpoint_batch = time.monotonic(), batch

    def _evaluate(self, last: bool) -> dict[str, float]:
        """The metrics of the evaluated splits; with ``train.eval_calib: end`` the calibration split only
        after the last epoch (NaN before, so that metrics.csv keeps its columns in their order)."""
        out: dict[str, float] = {}
        calib = self.tc.eval_calib == "every" or last
        models = [("", self.model)] + ([("ema_", self.ema.module)] if self.ema is not None else [])
        # Iterating a DataLoader draws a seed from the global generator: evaluation runs on a forked RNG
        # so that how often (and whether the EMA) is evaluated leaves the training stream unchanged.
        if not (self.tc.sync_bn or self.tc.freeze_bn):  # each rank's BN statistics saw only its shard
            for _, model in models:
                average_batchnorm_stats(model, self.ctx)
        with torch.random.fork_rng(devices=self._cuda_indices()):
            for prefix, model in models:
                for split in ("calib", "test"):
                    if split == "calib" and not calib:
                        skipped = ExitMetrics(self.exit_names, self.ctx.device).as_dict(prefix + split)
                        out.update(dict.fromkeys(skipped, math.nan))
                        continue
                    metrics = evaluate(model, self.loaders[split], self.exit_names, self.ctx, amp=self.tc.amp,
                                       channels_last=self.tc.channels_last)
                    out.update(metrics.as_dict(prefix + split))
        return out

    def _cuda_indices(self) -> list[int]:
        return [self.ctx.device.index] if self.ctx.device.type == "cuda" else []

    # ------------------------------------------------------------------ files

    def _save(self, epoch: int, step: int, rngs: list, row: dict, wall_time: float, **within_epoch: Any) -> None:
        from dynexit.models.checkpoint import save_model

        extra: dict[str, Any] = {**scaler_state(self.scaler), **within_epoch}
        if self.ema is not None:
            extra["ema"] = self.ema.module.state_dict()
        save_model(self.ckpt_path, self.model, format=FORMAT, optimizer=self.optimizer.state_dict(),
                   epoch=epoch, step=step, rng=rngs, config=self.config, metrics=row, wall_time=wall_time,
                   world_size=self.ctx.world_size, exit_names=list(self.exit_names), **extra)

    def _finish(self, epochs: int, step: int, wall_time: float, metrics: dict, start_epoch: int) -> TrainResult:
        result = TrainResult(run_dir=self.run_dir, checkpoint=self.ckpt_path,
                             metrics_csv=self.run_dir / METRICS_FILE, config_path=self.run_dir / CONFIG_FILE,
                             metrics={k: float(v) for k, v in metrics.items()}, epochs=int(epochs),
                             steps=int(step), wall_time=float(wall_time), start_epoch=int(start_epoch))
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / RESULT_FILE, json.dumps(result.to_json(), indent=2))
        return result


def _summary(row: dict[str, float], exit_names: tuple[str, ...]) -> str:
    text = f"loss {row['train_loss']:.4f}"
    if f"test_acc_{exit_names[-1]}" in row:
        accs = " ".join(f"{e} {row[f'test_acc_{e}']:.2f}" for e in exit_names)
        text += f", test acc {accs}"
    return f"{text} ({row['epoch_time']:.1f} s)"


def global_batch(tc, world_size: int) -> int:
    """Images per optimizer step: processes x batch per process x accumulation steps."""
    return world_size * tc.batch_size * tc.accum_steps


def scaled_recipe(tc, world_size: int):
    """``tc`` as this run trains with it: logs the global batch; against ``train.reference_batch``, warns with
    the linearly scaled lr, or applies it (a copy of ``tc`` with lr and min_lr scaled) with ``scale_lr``."""
    batch = global_batch(tc, world_size)
    log.info("global batch: %d process(es) x %d per process x %d accumulation step(s) = %d images per "
             "optimizer step", world_size, tc.batch_size, tc.accum_steps, batch)
    if tc.reference_batch is None or batch == tc.reference_batch:
        return tc
    factor = batch / tc.reference_batch
    if not tc.scale_lr:
        log.warning("global batch %d differs from the recipe's %d (train.reference_batch): linear scaling "
                    "gives lr %.4g instead of %.4g; set train.scale_lr=true to apply it, or use %d processes "
                    "x batch_size x accum_steps = %d", batch, tc.reference_batch, tc.lr * factor, tc.lr,
                    world_size, tc.reference_batch)
        return tc
    scaled = copy.deepcopy(tc)
    scaled.lr, scaled.min_lr = tc.lr * factor, tc.min_lr * factor
    log.info("train.scale_lr: lr %.4g -> %.4g, min_lr %.4g -> %.4g (global batch %d / %d)", tc.lr, scaled.lr,
             tc.min_lr, scaled.min_lr, batch, tc.reference_batch)
    return scaled


def configure_kernels(deterministic: bool, device_type: str) -> None:
    """On CUDA: deterministic kernels when asked, else the fast ones (cuDNN picks the fastest convolution
    algorithm per shape; float32 matmuls and convolutions in TF32, as torchvision's and timm's recipes)."""
    if deterministic:
        _deterministic_kernels()
    elif device_type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


def _deterministic_kernels() -> None:
    """Deterministic CUDA kernels (CPU runs get deterministic algorithms from ``run_threads``)."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_metrics(run_dir: str | Path):
    """The run's metrics.csv as a DataFrame (FileNotFoundError when missing)."""
    from dynexit.utils import read_csv_file

    return read_csv_file(Path(run_dir) / METRICS_FILE, "metrics file")

