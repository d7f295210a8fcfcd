"""The ``train`` section of a run configuration, and its validation.

Defaults suit small runs (no mixup, no warm-up); ``experiments/train_imagenet_official.yaml`` holds the
official ImageNet recipe. The batch size is per process: the batch of one optimizer step is
``batch_size * processes * accum_steps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

# Official README: the CNN and merged exits weigh 1, the two latent exits 0.5 each.
DEFAULT_LOSS_WEIGHTS = {"early3": 0.5, "att": 0.5, "cnn": 1.0, "merge": 1.0}
MIXUP_MODES = ("batch", "pair", "elem")


@dataclass
class TrainConfig:
    """How one model is trained (the ``train`` section of a RunConfig)."""

    epochs: int = 10
    batch_size: int = 64  # per process
    eval_batch_size: Optional[int] = None  # None: 2 * batch_size
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)
    # AdamW; no weight decay on biases and 1-D parameters (norms, BN).
    lr: float = 1e-3
    min_lr: float = 1e-6  # the cosine schedule ends here
    warmup_epochs: float = 0.0  # linear per-iteration warm-up, then cosine to min_lr
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: Optional[float] = None  # max global gradient norm; None: no clipping
    # Loss: sum over exits of weight * CE, plus self-distillation from the detached last exit.
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    distill_alpha: float = 0.5  # 0 turns self-distillation off
    distill_temperature: float = 1.0
    label_smoothing: float = 0.0
    # Mixup/CutMix through timm (off when both alphas are 0); label_smoothing goes into the mixed targets.
    mixup: float = 0.0  # mixup alpha
    cutmix: float = 0.0  # cutmix alpha
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # batch | pair | elem
    # Exponential moving average of the weights, evaluated each epoch and saved in the checkpoint.
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay ramps up as 1 - (1 + step)^(-2/3) (timm), capped at ema_decay
    # Speed and devices.
    threads: int = 1  # CPU threads of the run (torch); part of its identity: the thread count changes the numbers
    channels_last: bool = True  # NHWC tensors: several times faster depthwise convolutions on CPU
    amp: bool = False  # bfloat16 autocast (CUDA only; ignored with a warning elsewhere)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only, as torch's SyncBatchNorm)
    freeze_bn: bool = False  # BatchNorm layers normalise with their running statistics and do not update them
    deterministic: bool = False  # deterministic CUDA kernels (cuDNN, cuBLAS); CPU runs always use deterministic ones
    # Reporting.
    eval_every: int = 1  # evaluate calibration and test splits every N epochs (and always after the last)
    progress: Optional[bool] = None  # tqdm bar per epoch; None: only on a terminal
    tensorboard: bool = True  # scalars under <run_dir>/tb


def _positive_int(cfg: TrainConfig, name: str, allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name} must be a positive integer, got {value!r}")


def _number(cfg: TrainConfig, name: str, low: float, high: float = math.inf, low_open: bool = False,
            allow_none: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"train.{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"train.{name} must be in {interval}, got {value!r}")


def validate_train_config(cfg: TrainConfig) -> None:
    """Raises ValueError/TypeError naming the first bad field of ``cfg`` (field names as ``train.<name>``)."""
    for name in ("epochs", "batch_size", "accum_steps", "eval_every", "threads"):
        _positive_int(cfg, name)
    _positive_int(cfg, "eval_batch_size", allow_none=True)
    _number(cfg, "lr", 0.0, low_open=True)
    _number(cfg, "min_lr", 0.0)
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"train.min_lr ({cfg.min_lr:g}) must not exceed train.lr ({cfg.lr:g})")
    _number(cfg, "warmup_epochs", 0.0, float(cfg.epochs))
    _number(cfg, "weight_decay", 0.0)
    _number(cfg, "eps", 0.0, low_open=True)
    if len(cfg.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(cfg.betas)!r}")
    _number(cfg, "clip_grad", 0.0, low_open=True, allow_none=True)
    for exit_name, weight in cfg.loss_weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"train.loss_weights.{exit_name} must be a number >= 0, got {weight!r}")
    _number(cfg, "distill_alpha", 0.0)
    _number(cfg, "distill_temperature", 0.0, low_open=True)
    _number(cfg, "label_smoothing", 0.0, 1.0)
    if cfg.label_smoothing == 1.0:
        raise ValueError("train.label_smoothing must be below 1")
    for name in ("mixup", "cutmix"):
        _number(cfg, name, 0.0)
    for name in ("mixup_prob", "mixup_switch_prob"):
        _number(cfg, name, 0.0, 1.0)
    if cfg.mixup_mode not in MIXUP_MODES:
        raise ValueError(f"train.mixup_mode must be one of {', '.join(MIXUP_MODES)}, got {cfg.mixup_mode!r}")
    if uses_mixup(cfg) and cfg.batch_size % 2:
        raise ValueError(f"train.batch_size must be even with mixup/cutmix (timm mixes a batch with its "
                         f"mirror), got {cfg.batch_size}")
    _number(cfg, "ema_decay", 0.0, 1.0)
    if cfg.sync_bn and cfg.freeze_bn:
        raise ValueError("train.sync_bn and train.freeze_bn exclude each other (frozen BatchNorm has no "
                         "batch statistics to synchronise)")


def uses_mixup(cfg: TrainConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0
