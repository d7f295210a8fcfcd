"""Accuracy against measured latency: each configuration's latency to reach each exit, measured on the machine
at hand (``dynexit bench RESULTS_DIR`` writes ``RESULTS_DIR/latency.csv``), turned into the expected latency
of every operating point of the budgeted curves (``report/latency.csv`` and a figure).

Weights do not change latency, so each configuration is timed on an untrained copy of its architecture (the
model section of one of its runs' ``config.yaml``), at batch 1 and at a larger batch, as the median of
repeated runs after warm-up (:func:`dynexit.timing.exit_latencies`: segments 0..k on one batch, all exits
interleaved). The expected latency of an operating point is the sum over exits of the share of test images
leaving there times the per-image latency of reaching that exit (batch time / batch size), the same
expectation as its expected GMACs.
"""
from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dynexit.analysis.results import Results, load_results

log = logging.getLogger(__name__)

LATENCY_FILE = "latency.csv"
BATCH_SIZES = (1, 32)
MEASURED_COLUMNS = ["configuration", "run_id", "exit", "position", "gmacs", "batch_size", "batch_ms", "latency_ms",
                    "spread", "repeats", "threads", "device", "machine", "load", "torch"]
EXPECTED_COLUMNS = ["configuration", "point", "batch_size", "gmacs", "accuracy", "latency_ms"]


def machine_description() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), core count and OS: what a latency depends on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def measure_latency(results_dir: str | Path, batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 10,
                    warmup: int = 2, device: str = "cpu") -> pd.DataFrame:
    """Latency of reaching each exit of each configuration of an experiment, on an untrained copy of its
    architecture: one row per configuration, exit and batch size with :data:`MEASURED_COLUMNS`
    (``batch_ms``: median time of one batch; ``latency_ms``: per image, ``batch_ms / batch_size``; ``spread``:
    interquartile range over the median; ``load``: the machine's 1-minute load average when the batch size
    was timed, since other work on the machine slows every figure). Uses torch's current thread count
    (recorded)."""
    import torch

    from dynexit.config import build_configured_model, load_run_config
    from dynexit.models.interface import check_multi_exit_model, model_setting
    from dynexit.timing import exit_latencies

    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    results = load_results(results_dir)
    machine, target = machine_description(), torch.device(device)
    rows = []
    for config in results.configs:
        rid = str(results.runs.loc[results.runs["config"] == config, "run_id"].iloc[0])
        path = results.run_folder(rid) / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the architecture of {config!r} is unknown")
        cfg = load_run_config(path)
        model = build_configured_model(cfg.model).eval()
        check_multi_exit_model(model, need_segments=True, purpose="latency of each exit")
        names = [str(n) for n in model.exit_names]
        if names != results.run_exits(rid):
            raise ValueError(f"{path}: the model has exits {names}, runs.csv lists {results.run_exits(rid)}")
        size = model_setting(model, "input_size") or cfg.data.image_size
        gmacs = results.runs.set_index("run_id").loc[rid]
        model.to(target)
        generator = torch.Generator().manual_seed(0)
        for batch in batch_sizes:
            x = torch.randn(int(batch), 3, size, size, generator=generator).to(target)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            timings = exit_latencies(model, x, repeats, warmup)
            for k, (name, timing) in enumerate(zip(names, timings), 1):
                rows.append({"configuration": config, "run_id": rid, "exit": name, "position": k,
                             "gmacs": float(gmacs[f"gmacs_{name}"]), "batch_size": int(batch),
                             "batch_ms": timing.median * 1e3, "latency_ms": timing.median * 1e3 / int(batch),
                             "spread": timing.spread, "repeats": repeats, "threads": torch.get_num_threads(),
                             "device": str(target), "machine": machine, "load": load,
                             "torch": torch.__version__})
            log.info("%s, batch %d: %s ms", config, batch,
                     ", ".join(f"{r['batch_ms']:.2f}" for r in rows[-len(names):]))
    return pd.DataFrame(rows, columns=MEASURED_COLUMNS)


def read_latency(path: str | Path) -> pd.DataFrame:
    """A ``latency.csv`` of :func:`measure_latency`; a missing column is an error naming the file."""
    from dynexit.utils import read_csv_file

    frame = read_csv_file(path, "latency file")
    missing = [c for c in ("configuration", "exit", "batch_size", "latency_ms") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {', '.join(map(repr, missing))}; write it with 'dynexit bench "
                         "RESULTS_DIR'")
    return frame


def expected_latency(results: Results, measured: pd.DataFrame) -> pd.DataFrame:
    """Expected latency of every operating point (:data:`EXPECTED_COLUMNS`), per configuration, point and
    batch size: sum over exits of the test share leaving there times the per-image latency of reaching it,
    averaged over seeds with the point's expected cost (``gmacs``) and test accuracy (``accuracy``, %). A
    static configuration is one point: its full latency. Configurations without measurements are left out
    (logged)."""
    from dynexit.analysis.behaviour import exit_shares

    shares = exit_shares(results)
    rows = []
    for config in results.configs:
        mine = measured[measured["configuration"] == config]
        if mine.empty:
            log.warning("latency.csv has no measurement of %s; left out of the latency figure", config)
            continue
        for batch, per_exit in mine.groupby("batch_size", sort=True):
            latency = per_exit.set_index("exit")["latency_ms"]
            if config in results.static_configs:
                runs = results.runs[results.runs["config"] == config]
                rows.append({"configuration": config, "point": 0, "batch_size": int(batch),
                             "gmacs": float(runs["gmacs_final"].mean()), "accuracy": float(runs["acc_final"].mean()),
                             "latency_ms": float(latency.iloc[-1])})
                continue
            part = shares[shares["config"] == config]
            unknown = sorted(set(part["exit"]) - set(latency.index))
            if unknown:
                raise ValueError(f"latency.csv has no latency of exit(s) {', '.join(unknown)} of {config!r}")
            part = part.assign(expected=part["share"] / 100 * part["exit"].map(latency))
            per_run = part.groupby(["run_id", "point"], sort=False).agg(
                gmacs=("test_expected_cost", "first"), accuracy=("test_accuracy", "first"),
                latency_ms=("expected", "sum")).reset_index()
            for point, group in per_run.groupby("point", sort=True):
                rows.append({"configuration": config, "point": int(point), "batch_size": int(batch),
                             "gmacs": float(group["gmacs"].mean()), "accuracy": float(group["accuracy"].mean()),
                             "latency_ms": float(group["latency_ms"].mean())})
    return pd.DataFrame(rows, columns=EXPECTED_COLUMNS)


def latency_caption(measured: pd.DataFrame) -> str:
    """Where and how the latencies were measured, for the figure's caption."""
    first = measured.iloc[0]
    batches = ", ".join(str(b) for b in sorted(set(measured["batch_size"])))
    load = (f"; load average {measured['load'].min():.1f}-{measured['load'].max():.1f} while timing"
            if "load" in measured and measured["load"].notna().any() else "")
    return (f"Latency measured on {first.get('machine', 'an unrecorded machine')}, {first.get('device', '')} with "
            f"{first.get('threads', '?')} threads, torch {first.get('torch', '?')}; batches of {batches}; median of "
            f"{first.get('repeats', '?')} runs on an untrained copy of each architecture{load}.")


def plot_latency_curves(results: Results, table: pd.DataFrame):
    """Test accuracy against expected GMACs (left) and against expected latency per image at each measured
    batch size (right), one line per configuration (mean over seeds of each operating point), static models
    as squares. ``None`` when the table is empty."""
    from dynexit.analysis.figures import ACC_LABEL, COST_LABEL, config_colors, new_figure

    if table.empty:
        return None
    batches = sorted(set(table["batch_size"]))
    fig = new_figure(4.3 * (1 + len(batches)) + 1.8, 4.0)
    axes = fig.subplots(1, 1 + len(batches), sharey=True, squeeze=False)[0]
    colors = config_colors(results)
    first = table[table["batch_size"] == batches[0]]
    panels = [(axes[0], first, "gmacs", COST_LABEL, "against GMACs")] + [
        (ax, table[table["batch_size"] == b], "latency_ms", "expected latency per image (ms)", f"batch {b}")
        for ax, b in zip(axes[1:], batches)]
    for ax, rows, column, label, title in panels:
        for config in dict.fromkeys(rows["configuration"]):
            line = rows[rows["configuration"] == config].sort_values(column, kind="stable")
            style = "s" if config in results.static_configs else ".-"
            ax.plot(line[column], line["accuracy"], style, color=colors[config], label=config, ms=6, lw=1.4)
        ax.set_xlabel(label, fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ACC_LABEL)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", title="configuration",
               title_fontsize="small")
    fig.suptitle(f"{results.name}: accuracy against measured latency")
    return fig
