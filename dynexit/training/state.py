"""What survives a restart: seeding, RNG state, the training checkpoint and the run folder's config check.

The checkpoint (``checkpoint.pt``) is a dynexit model checkpoint (``dynexit.models.checkpoint``: ``model`` and
``model_config``, so ``load_model`` reads it, ``ema=True`` for the EMA weights) plus the training state:
``optimizer``, ``epoch`` (completed), ``step`` (optimizer steps), ``rng`` (one entry per process:
python, numpy, torch, CUDA and train-loader generator states), ``config`` (the resolved RunConfig),
``metrics`` (the last epoch's row of metrics.csv), ``wall_time`` and ``world_size``; with fp16 on CUDA also
``scaler`` (the gradient scaler's scale and growth tracker, plain numbers). A checkpoint written within an epoch
(``train.checkpoint_minutes``) also holds ``batch`` (the micro-batches of epoch ``epoch + 1`` done),
``train_metrics`` (that epoch's sums so far, one entry per process) and ``epoch_time`` (its seconds so far);
its ``rng`` entries hold the generators as they are at that batch, and the train loader's as it was when the
epoch began.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
FORMAT = "dynexit-train-1"
# Config keys a run may resume with other values of: evaluation and reporting (evaluation runs on a
# forked RNG, so they leave the weights unchanged), the loader worker count (workers change the speed, not the
# images: dynexit.data.loaders), where the files are staged, the checkpoint interval and the process-group timeout.
RESUMABLE_KEYS = ("eval", "data.num_workers", "data.stage_to", "train.progress", "train.tensorboard",
                  "train.eval_batch_size", "train.eval_every", "train.eval_calib", "train.checkpoint_minutes",
                  "train.dist_timeout_min")


def seed_everything(seed: int) -> None:
    """Seeds python's random, numpy's global generator (timm's Mixup draws from it) and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(loader_generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """Every random state of this process as tensors and plain lists/numbers, so that a checkpoint holding
    it loads with ``torch.load(weights_only=True)`` and no allow-list."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": str(kind), "key": [int(k) for k in key], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: Optional[torch.Generator] = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], np.asarray(numpy["key"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


def scaler_state(scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """The checkpoint entry of the gradient scaler: ``{"scaler": its state}`` (floats and ints), or {} when it
    is disabled (bf16 and float32 need no loss scaling; a disabled scaler's state is empty)."""
    return {"scaler": scaler.state_dict()} if scaler.is_enabled() else {}


def restore_scaler(scaler: torch.amp.GradScaler, checkpoint: dict[str, Any]) -> None:
    """Gives ``scaler`` the state the checkpoint saved, so that fp16 loss scaling resumes at its scale and
    growth count (a disabled scaler ignores it). A checkpoint written before the scaler was saved resumes
    at the initial scale, as it always did, with a warning."""
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    elif scaler.is_enabled():
        log.warning("the checkpoint holds no gradient scaler state (written by an older dynexit): fp16 loss "
                    "scaling restarts at its initial scale %g", scaler.get_scale())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": leaf}."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """``"key: old -> new"`` for every leaf where two resolved configs differ (keys under ``ignore`` skipped)."""
    a, b = flatten(old), flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


# What resuming reads from a training checkpoint besides the weights.
TRAINING_KEYS = ("optimizer", "epoch", "step", "rng", "config", "metrics", "wall_time")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded safely. A file that is not one, is damaged or holds anything but
    tensors and plain values is a ValueError naming it and saying how to start the run over."""
    from dynexit.models.checkpoint import OutdatedCheckpointError, read

    start_over = (f"To start this run over, delete {path} (training restarts from epoch 0) or the whole run "
                  f"folder {path.parent}")
    try:
        checkpoint = read(path)
    except OutdatedCheckpointError:
        raise
    except ValueError as err:
        raise ValueError(f"{err}. {start_over}") from None
    if checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is a model checkpoint without training state (not written by dynexit "
                         f"training); move it away or use another run folder")
    missing = [key for key in TRAINING_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} lacks the training state {', '.join(missing)}. {start_over}")
    return checkpoint


def check_run_folder(run_dir: Path, config: dict, resume: bool, source: str) -> Optional[dict[str, Any]]:
    """The checkpoint to resume from (None: start afresh), after checking that the run folder belongs to
    this configuration. ``config`` is the resolved RunConfig as a dict, ``source`` names where it came from.

    Raises ValueError when ``run_dir`` holds a checkpoint or a ``config.yaml`` of a different
    configuration (naming both and the keys that differ), FileExistsError when it holds a checkpoint
    and ``resume`` is False. Nothing is written.
    """
    from dynexit.config import load_run_config, to_container

    ckpt_path, config_path = run_dir / CHECKPOINT_FILE, run_dir / CONFIG_FILE
    if ckpt_path.exists():
        if not resume:
            raise FileExistsError(f"{ckpt_path} exists and resume is off; delete it or use another run folder")
        checkpoint = read_checkpoint(ckpt_path)
        diffs = config_differences(checkpoint["config"], config)
        if diffs:
            raise ValueError(f"{ckpt_path} was trained with a different configuration than {source} "
                             f"({'; '.join(diffs)}); use another run folder")
        return checkpoint
    if config_path.exists():
        saved = to_container(load_run_config(config_path, import_factories=False))  # data, not code
        diffs = config_differences(saved, config)
        if diffs:
            raise ValueError(f"run folder {run_dir} belongs to another configuration: {config_path} differs "
                             f"from {source} ({'; '.join(diffs)}); use another run folder")
    return None
