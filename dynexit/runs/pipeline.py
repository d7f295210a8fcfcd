"""One run, start to finish: train, per-exit logits on the calibration and test splits, per-exit costs,
the budgeted curve and anytime accuracies, and a summary; every file lands in the run folder.

Each step skips itself when its output exists (after a crash the run resumes where it stopped); the
training loop resumes from its last checkpoint by itself.

Evaluation stands apart from training: ``eval.json`` records the ``eval`` settings the run's outputs were
computed with, and ``evaluate_run`` brings a trained run's outputs up to date with new settings without
training: the curve, anytime accuracies and summary from the saved logits, the logits themselves again
from the checkpoint only when a setting they depend on changed (``LOGIT_SETTINGS``).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from dynexit.config import RunConfig, save_yaml
from dynexit.curves import accuracy_at_budget
from dynexit.runs.folders import (
    EVAL_FILE,
    LOCK_HELD_ENV,
    LOGIT_SETTINGS,
    SUMMARY_FILE,
    evaluation_record,
    read_evaluation_record,
)
from dynexit.utils import atomic_write, atomic_write_text, read_csv_file, read_json_file

log = logging.getLogger(__name__)


def run_pipeline(cfg: RunConfig, folder: Path, devices: list[str], name: str | None = None) -> dict:
    """Executes the run described by ``cfg`` in ``folder`` on ``devices``; returns the summary. ``name``:
    the run's readable name in TensorBoard (``experiment/variant_seedK``).

    It computes with ``cfg.train.threads`` CPU threads, with deterministic algorithms on the CPU."""
    from dynexit.training.determinism import run_threads

    folder = Path(folder)
    with run_threads(cfg.train.threads, deterministic_cpu=devices[0] == "cpu"):
        _train(cfg, folder, devices, name)
        return _evaluate(cfg, folder, devices[0])


def evaluate_run(cfg: RunConfig, folder: Path, device: str = "cpu") -> dict:
    """Brings the outputs of the trained run in ``folder`` up to date with ``cfg.eval``, without training:
    the logits from the checkpoint only when a setting in ``LOGIT_SETTINGS`` changed (or they are missing),
    then the curve, anytime accuracies and summary. Returns the summary."""
    from dynexit.training.determinism import run_threads

    folder = Path(folder)
    with run_threads(cfg.train.threads, deterministic_cpu=device == "cpu"):
        return _evaluate(cfg, folder, device)


def _write_record(folder: Path, record: dict) -> None:
    atomic_write_text(folder / EVAL_FILE, json.dumps(record, indent=2))


# --------------------------------------------------------------------------- steps

def _evaluate(cfg: RunConfig, folder: Path, device: str) -> dict:
    want = evaluation_record(cfg.eval)
    record = read_evaluation_record(folder)
    model = None
    logit_paths = _logit_paths(folder)
    logits_current = record.get("logits") == want["logits"] and all(p.is_file() for p in logit_paths.values())
    # What this evaluation rewrites is marked out of date before any of it is touched, and the record is
    # written whole last: a kill at any point leaves the run to be evaluated again, never done with outputs
    # of two evaluations (calibration logits of one set of weights, test logits of another).
    _write_record(folder, {"logits": want["logits"]} if logits_current else {})
    if logits_current:
        calib, test = _load_logits(logit_paths)
    else:
        model = _trained_model(cfg, folder)
        calib, test = _collect_logits(cfg, folder, model, device)
        _write_record(folder, {"logits": want["logits"]})
    costs = _costs(cfg, folder, model)
    curve, anytime = _curves(cfg, folder, calib, test, costs)
    names = [str(e) for e in costs["exit"]]
    summary = summarize(cfg, _parameters(cfg, model), names, costs, curve, anytime, _train_seconds(folder))
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2))
    save_yaml(cfg, folder / "config.yaml")  # the run's resolved configuration, with the eval it now has
    _write_record(folder, want)
    return summary


def _train(cfg: RunConfig, folder: Path, devices: list[str], name: str | None = None) -> None:
    from dynexit.runs.devices import device_environment
    from dynexit.training import train

    if len(devices) > 1:  # several GPUs for one run: torchrun, then evaluate here
        save_yaml(cfg, folder / "config.yaml")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(devices)}",
               "-m", "dynexit", "train", str(folder / "config.yaml"), "--out", str(folder),
               "--device", "cuda" if devices[0].startswith("cuda") else "cpu"]  # no GPU: an error, never the CPU
        log.info("launching %s", " ".join(cmd))
        # torchrun's ranks see exactly these GPUs, and train under this process's lock on the folder
        env = {**os.environ, **device_environment(devices), LOCK_HELD_ENV: str(folder.resolve())}
        subprocess.run(cmd, check=True, env=env)
        return
    train(cfg, folder, device=devices[0], resume=True, run_name=name)


def _train_seconds(folder: Path) -> float:
    """Seconds spent training, summed over resumed sessions (NaN when the run folder does not say)."""
    from dynexit.training.loop import RESULT_FILE

    path = folder / RESULT_FILE
    if not path.is_file():
        return float("nan")
    return float(read_json_file(path, "training result").get("wall_time", float("nan")))


def _trained_model(cfg: RunConfig, folder: Path):
    from dynexit.models.checkpoint import load_model

    path = folder / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run's logits must be collected again (they are "
                                f"missing, or eval.{' or eval.'.join(LOGIT_SETTINGS)} changed) and that needs "
                                f"its checkpoint; restore it, or delete {folder} to train the run again")
    return load_model(path, ema=cfg.eval.use_ema, factory=cfg.model.factory)  # the spec names the factory


def _logit_paths(folder: Path) -> dict[str, Path]:
    return {split: folder / f"logits_{split}.npz" for split in ("calib", "test")}


def _load_logits(paths: dict[str, Path]):
    from dynexit.logits import load_logits

    return tuple(load_logits(p) for p in paths.values())


def _collect_logits(cfg: RunConfig, folder: Path, model, device: str):
    import torch

    from dynexit.data import build_datasets, build_loaders
    from dynexit.logits import collect_logits, save_logits

    splits = build_datasets(cfg.data, folder)
    loaders = build_loaders(splits, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                            seed=cfg.seed)
    model.to(device)  # load_model gives a CPU model; the batches go to ``device``
    # eval.compile: the first batches of each shape compile; the eager model stays for counting costs.
    net = torch.compile(model) if cfg.eval.compile else model
    out = []
    for split, path in _logit_paths(folder).items():
        logits, targets = collect_logits(net, loaders[split], device=device)
        save_logits(path, logits, targets)
        out.append((logits, targets))
    return tuple(out)


def _parameters(cfg: RunConfig, model) -> int:
    """The model's parameter count; without a loaded model, that of its architecture built afresh."""
    if model is None:
        from dynexit.config import build_configured_model

        model = build_configured_model(cfg.model)
    return int(sum(p.numel() for p in model.parameters()))


def _costs(cfg: RunConfig, folder: Path, model) -> pd.DataFrame:
    from dynexit.costs import exit_costs, resolve_handles

    path = folder / "costs.csv"
    if path.is_file():
        return read_csv_file(path, "costs file")
    if model is None:
        model = _trained_model(cfg, folder)
    if cfg.model.costs is not None:  # given by the user (a model without segments)
        costs = given_costs(model.exit_names, cfg.model.costs)
    else:
        costs = exit_costs(model.cpu(), input_size=cfg.data.image_size, handles=resolve_handles(cfg.model.op_handles))
    atomic_write(path, lambda tmp: costs.to_csv(tmp, index=False))
    return costs


def given_costs(exit_names, gmacs) -> pd.DataFrame:
    """The costs table of ``model.costs``: ``exit``, ``index``, ``gmacs`` (cumulative, as given) and
    ``segment_gmacs``; parameters are not known per exit."""
    gmacs = [float(g) for g in gmacs]
    segments = [b - a for a, b in zip([0.0, *gmacs], gmacs)]
    return pd.DataFrame({"exit": list(exit_names), "index": range(len(gmacs)), "gmacs": gmacs,
                         "segment_gmacs": segments, "source": "model.costs"})


def _curves(cfg: RunConfig, folder: Path, calib, test, costs: pd.DataFrame):
    from dynexit.policies import anytime_accuracy, budgeted_curve

    gmacs = costs["gmacs"].to_numpy(dtype=float)
    names = [str(e) for e in costs["exit"]]
    (calib_logits, calib_targets), (test_logits, test_targets) = calib, test
    if len(gmacs) > 1:
        curve = budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, gmacs,
                               grid=cfg.eval.grid, criterion=cfg.eval.criterion, exit_names=names)
    else:  # one exit: the curve is the single static point
        accuracy = float((test_logits[0].argmax(-1) == test_targets).mean() * 100)
        calib_accuracy = float((calib_logits[0].argmax(-1) == calib_targets).mean() * 100)
        curve = pd.DataFrame([{"calib_accuracy": calib_accuracy, "calib_expected_cost": gmacs[0],
                               "test_accuracy": accuracy, "test_expected_cost": gmacs[0]}])
    anytime = anytime_accuracy(test_logits, test_targets, gmacs, exit_names=names)
    atomic_write(folder / "curve.csv", lambda tmp: curve.to_csv(tmp, index=False))
    atomic_write(folder / "anytime.csv", lambda tmp: anytime.to_csv(tmp, index=False))
    return curve, anytime


def summarize(cfg: RunConfig, params: int, names: list[str], costs: pd.DataFrame, curve: pd.DataFrame,
              anytime: pd.DataFrame, train_seconds: float) -> dict:
    """The run's row of runs.csv: per-exit test accuracy and cost, parameters, time, curve summaries."""
    row: dict = {"params": int(params), "train_seconds": train_seconds, "num_exits": len(names)}
    for k, name in enumerate(names):
        row[f"acc_{name}"] = float(anytime["accuracy"].iloc[k])
        row[f"gmacs_{name}"] = float(costs["gmacs"].iloc[k])
    row["acc_final"] = row[f"acc_{names[-1]}"]
    row["gmacs_final"] = row[f"gmacs_{names[-1]}"]
    row["curve_min_gmacs"] = float(curve["test_expected_cost"].min())
    row["curve_max_gmacs"] = float(curve["test_expected_cost"].max())
    row["curve_best_accuracy"] = float(curve["test_accuracy"].max())
    for budget in cfg.eval.budgets:
        row[f"acc_at_{budget:g}"] = accuracy_at_budget(curve["test_expected_cost"], curve["test_accuracy"], budget)
    return row
