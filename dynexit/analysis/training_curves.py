"""How training went: per-exit accuracy and training loss against epoch, from each run's ``metrics.csv``
(columns as written by :mod:`dynexit.training.metrics`: ``{split}_acc_{exit}``, ``{split}_loss_{exit}``).

One line per configuration (mean over seeds) with a band from the lowest to the highest seed; one panel per
exit and metric (rows: evaluated accuracy, training accuracy,
training loss; columns: exits). The evaluated accuracy has a point per evaluated epoch only
(``train.eval_every``).
"""
from __future__ import annotations

import logging

import pandas as pd

from dynexit.analysis.results import Results

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"  # the name the training loop writes in each run folder
#: Panel rows: (metric name in the tables, metrics.csv column prefixes in order of preference, axis label).
METRICS = (
    ("accuracy", ("test_acc", "calib_acc"), "evaluated accuracy (%)"),
    ("train_accuracy", ("train_acc",), "training accuracy (%)"),
    ("train_loss", ("train_loss",), "training loss (cross-entropy)"),
)


def _read_metrics(path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        rows = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable metrics CSV ({err})") from None
    if "epoch" not in rows.columns:
        raise ValueError(f"{path} has no 'epoch' column")
    return rows


def training_history(results: Results) -> pd.DataFrame:
    """Long table of every run's per-exit metrics: ``config, run_id, seed, exit, metric, split, epoch,
    value``. ``metric`` is ``accuracy`` (from the test split, else calibration: the first with any value
    in the run), ``train_accuracy`` (running, over the epoch's training batches) or ``train_loss``;
    epochs without a value (no evaluation that epoch) are left out. Runs
    without ``metrics.csv`` are skipped (logged)."""
    rows = []
    for rid, config, seed in zip(results.runs["run_id"], results.runs["config"], results.runs["seed"]):
        table = _read_metrics(results.run_folder(rid) / METRICS_FILE)
        if table is None:
            log.info("run %s has no %s: no training curve", rid, METRICS_FILE)
            continue
        for name in results.run_exits(rid):
            for metric, prefixes, _ in METRICS:
                column = next((f"{p}_{name}" for p in prefixes
                               if f"{p}_{name}" in table and table[f"{p}_{name}"].notna().any()), None)
                if column is None:
                    continue
                values = table[["epoch", column]].dropna()
                split = column[: -len(name) - 1].rsplit("_", 1)[0]
                rows += [{"config": config, "run_id": rid, "seed": seed, "exit": name, "metric": metric,
                          "split": split, "epoch": int(e), "value": float(v)}
                         for e, v in zip(values["epoch"], values[column])]
    return pd.DataFrame(rows, columns=["config", "run_id", "seed", "exit", "metric", "split", "epoch", "value"])


def training_bands(history: pd.DataFrame, results: Results) -> pd.DataFrame:
    """Per configuration, exit, metric and epoch: ``mean``, ``std`` (over seeds, ddof 1; blank for one
    seed), ``min``, ``max`` and ``seeds`` (how many runs have the epoch), in display order."""
    columns = ["config", "exit", "metric", "split", "epoch", "mean", "std", "min", "max", "seeds"]
    if history.empty:
        return pd.DataFrame(columns=columns)
    bands = history.groupby(["config", "exit", "metric", "split", "epoch"], sort=False)["value"].agg(
        mean="mean", std="std", min="min", max="max", seeds="count").reset_index()
    order = {c: i for i, c in enumerate(results.configs)}
    exits = {n: i for i, n in enumerate(results.exit_names)}
    metrics = {m: i for i, (m, _, _) in enumerate(METRICS)}
    bands = bands.assign(_c=bands["config"].map(order), _e=bands["exit"].map(exits), _m=bands["metric"].map(metrics))
    bands = bands.sort_values(["_m", "_e", "_c", "epoch"], kind="stable").drop(columns=["_c", "_e", "_m"])
    return bands[columns].reset_index(drop=True)


def plot_training_curves(results: Results, bands: pd.DataFrame | None = None):
    """Per-exit evaluated accuracy, training accuracy and training loss (groups of panels) against epoch, one
    panel per exit (exits by position, exit 1..K, when the configurations' exits have different names),
    wrapped at four per row, one line per configuration (mean over seeds, band from the lowest to the highest
    seed), a shared legend below. ``None`` when no run has a metrics file."""
    from matplotlib.ticker import MaxNLocator

    from dynexit.analysis.figures import config_colors, wrapped_panels
    from dynexit.analysis.tables import exit_labels

    bands = training_bands(training_history(results), results) if bands is None else bands
    if bands.empty:
        return None
    if exit_labels(results)[1]:  # mixed families: each configuration's k-th exit in panel "exit k"
        position = {(config, name): f"exit {k}" for config in results.configs
                    for rid in results.runs.loc[results.runs["config"] == config, "run_id"][:1]
                    for k, name in enumerate(results.run_exits(rid), 1)}
        bands = bands.assign(exit=[position.get((c, e), e) for c, e in zip(bands["config"], bands["exit"])])
        names = list(dict.fromkeys(sorted(set(bands["exit"]), key=lambda e: int(e.split()[-1]))))
    else:
        names = [n for n in results.exit_names if n in set(bands["exit"])]
    metrics = [m for m in METRICS if m[0] in set(bands["metric"])]
    colors = config_colors(results)
    groups = [[(metric, name) for name in names if ((bands["metric"] == metric) & (bands["exit"] == name)).any()]
              for metric, _, _ in metrics]
    fig, axes, rows_of = wrapped_panels(groups, 3.2, 2.7, extra_height=1.2)
    handles = {}
    labels = {metric: label for metric, _, label in metrics}
    for (metric, name), ax in axes.items():
        rows = bands[(bands["metric"] == metric) & (bands["exit"] == name)]
        for config in results.configs:
            line = rows[rows["config"] == config]
            if line.empty:
                continue
            # a single epoch (evaluated at the end only) shows as a point with its seed range
            style = "o-" if len(line) == 1 else ".-"
            (h,) = ax.plot(line["epoch"], line["mean"], style, color=colors[config], lw=1.4, ms=4)
            handles.setdefault(config, h)
            if (line["max"] > line["min"]).any():
                if len(line) == 1:
                    ax.errorbar(line["epoch"], line["mean"], fmt="none", color=colors[config], capsize=3,
                                yerr=[line["mean"] - line["min"], line["max"] - line["mean"]])
                else:
                    ax.fill_between(line["epoch"], line["min"], line["max"], color=colors[config], alpha=0.18,
                                    lw=0)
        split = ", ".join(sorted(set(rows["split"])))
        ax.set_title(f"{name}" + (f" ({split})" if metric == "accuracy" and split else ""), fontsize="medium")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize="small", labelleft=True, labelbottom=True)
        ax.set_ylabel(labels[metric], fontsize="small")
        ax.set_xlabel("epoch", fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row in rows_of:  # one metric: one y range
        for ax in row[1:]:
            ax.sharey(row[0])
    seeds = int(bands["seeds"].max())
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4),
               fontsize="small", title="configuration" + (" (mean over seeds, band: min to max)" if seeds > 1 else ""),
               title_fontsize="small")
    fig.suptitle(f"{results.name}: per-exit accuracy and training loss against epoch")
    return fig
