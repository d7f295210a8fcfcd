"""Figures of an experiment's results: budgeted curves (with the published numbers of the released
models), exit shares, exit accuracy and confidence histograms.

Figures use matplotlib's object API (``matplotlib.figure.Figure``, no pyplot), so they need no display.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dynexit.analysis.behaviour import confidence_histograms, exit_accuracy, exit_shares
from dynexit.analysis.results import Results
from dynexit.analysis.tables import curve_band

COST_LABEL = "expected cost per image (GMACs)"
ACC_LABEL = "top-1 test accuracy (%)"

# --------------------------------------------------------------------------------- published numbers

_README = "README per-exit top-1 [T], official-code GFLOPs (= GMACs) [C]"
_EXIT = "each exit (README)"
_rows = [
    # model, kind, exit, gmacs, accuracy, label (short, for legends), source
    *[("reg800m_perceiver_t128", "exit", e, g, a, _EXIT, _README) for e, g, a in
      [("early3", 0.459, 68.62), ("att", 1.065, 78.32), ("cnn", 1.228, 79.15), ("merge", 1.298, 79.86)]],
    *[("resnet50_0375_perceiver_t128", "exit", e, g, a, _EXIT, _README) for e, g, a in
      [("early3", 0.632, 72.93), ("att", 1.023, 77.52), ("cnn", 1.138, 74.32), ("merge", 1.207, 77.70)]],
    *[("mobilenetV3_0x75_perceiver_t128", "exit", e, g, a, _EXIT, _README) for e, g, a in
      [("early3", 0.098, 53.13), ("att", 0.182, 71.65), ("cnn", 0.207, 71.89), ("merge", 0.266, 74.59)]],
    # budgeted curves read off the paper's figures (about +-0.2 pt, +-3 % GMACs); a range of costs at
    # one accuracy is stored as its two ends
    *[("resnet50_0375_perceiver_t128", "curve", "", g, a, "curve (paper Fig. 8a)",
       "paper Fig. 8(a), first segment [F]") for g, a in [(0.68, 74.6), (0.75, 76.0), (1.0, 77.6), (1.2, 77.7)]],
    *[("mobilenetV3_0x75_perceiver_t128", "curve", "", g, a, "curve (paper Fig. 9)",
       "paper Fig. 9, first segment [F]") for g, a in [(0.19, 74.0), (0.22, 74.6), (0.25, 74.6)]],
    *[("reg800m_perceiver_t128", "curve", "", g, a, "curve (paper Fig. 8b/c)",
       "paper Fig. 8(b)/(c), segment inferred [F]") for g, a in [(0.72, 78.2), (1.0, 79.8), (1.1, 79.8)]],
]
#: Published numbers of the released ImageNet models (shared/reference/paper-numbers.md): per-exit
#: accuracy and cumulative cost (kind "exit") and points of the budgeted curves (kind "curve"), with a
#: short legend ``label`` and the ``source``. Labels: [T] exact from text or table, [F] read off a
#: figure, [C] computed with the official code.
PUBLISHED = pd.DataFrame(_rows, columns=["model", "kind", "exit", "gmacs", "accuracy", "label", "source"])
del _rows


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def config_colors(results: Results) -> dict[str, tuple]:
    """One colour per configuration, stable across figures."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(results.configs) <= 10 else "tab20"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(results.configs)}


def _exit_colors(names: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {n: cmap(0.1 + 0.8 * i / max(1, len(names) - 1)) for i, n in enumerate(names)}


def _published_for(results: Results, published: bool | str) -> pd.DataFrame:
    if published is False:
        return PUBLISHED.iloc[0:0]
    models = set(results.runs["model.name"].astype(str)) if "model.name" in results.runs else set()
    if published not in (True, "auto"):
        raise ValueError(f"published must be True, False or 'auto', got {published!r}")
    return PUBLISHED[PUBLISHED["model"].isin(models)]


def plot_budgeted_curves(results: Results, ax=None, published: bool | str = "auto", anytime: bool = True,
                         title: str | None = None):
    """Test accuracy against expected cost, one line per configuration (mean over seeds, with a band of
    one standard deviation), each exit alone as hollow markers (anytime), static backbones as points,
    and (``published``: ``"auto"`` for the released ImageNet presets present) the published numbers.
    Returns the figure; the legend (outside the axes, right) has one entry per configuration."""
    paper = _published_for(results, published)
    fig = new_figure(8.0 if paper.empty else 9.0, 4.8) if ax is None else ax.figure
    ax = ax if ax is not None else fig.add_subplot()
    colors = config_colors(results)
    band = curve_band(results)
    exits = results.exits.groupby(["config", "exit"], sort=False).agg(
        gmacs=("gmacs", "mean"), accuracy=("accuracy", "mean"), std=("accuracy", "std")).reset_index()
    handles, labels, anytime_points = [], [], []
    for config in results.configs:
        color = colors[config]
        points = exits[exits["config"] == config]
        if config in results.static_configs:
            handles.append(ax.errorbar(points["gmacs"], points["accuracy"], yerr=points["std"].fillna(0), fmt="s",
                                       ms=7, color=color, capsize=3, zorder=4))
            labels.append(config)
            continue
        line = band[band["config"] == config]
        handles += ax.plot(line["cost"], line["mean"], "-", color=color, lw=1.8, zorder=3)
        labels.append(config)
        if line["std"].notna().any():
            ax.fill_between(line["cost"], line["mean"] - line["std"], line["mean"] + line["std"],
                            color=color, alpha=0.2, lw=0, zorder=2)
        if anytime:
            anytime_points.append((points, color))
    bottom = _y_range(ax, band, exits[exits["config"].isin(results.static_configs)], paper,
                      pd.concat([p for p, _ in anytime_points]) if anytime_points else None)
    for points, color in anytime_points:
        near = points["accuracy"] >= bottom
        ax.errorbar(points.loc[near, "gmacs"], points.loc[near, "accuracy"], yerr=points.loc[near, "std"].fillna(0),
                    fmt="o", ms=5, mfc="none", color=color, capsize=2, lw=1, zorder=3)
        for gmacs, accuracy in zip(points.loc[~near, "gmacs"], points.loc[~near, "accuracy"]):  # far below: marked
            ax.plot([gmacs], [bottom], marker="v", ms=7, mfc="none", color=color, clip_on=False, zorder=5)
            ax.annotate(f"{accuracy:.1f}", (gmacs, bottom), xytext=(0, 6), textcoords="offset points", ha="center",
                        fontsize="x-small", color=color)
    if anytime and results.dynamic_configs:
        handles += ax.plot([], [], "o", mfc="none", color="0.3")
        labels.append("each exit alone (anytime)")
    models = paper["model"].unique()
    for (model, kind, label), rows in paper.groupby(["model", "kind", "label"], sort=False):
        style = dict(marker="x", ls="none") if kind == "exit" else dict(marker="+", ls=":", ms=9)
        handles += ax.plot(rows["gmacs"], rows["accuracy"], color="black", **style)
        labels.append(f"published: {label}" if len(models) == 1 else f"published {model}: {label}")
    ax.set_xlabel(COST_LABEL)
    ax.set_ylabel(ACC_LABEL)
    ax.set_title(title if title is not None else f"{results.name}: budgeted accuracy{_data_suffix(results)}")
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
              title="configuration (mean ± std over seeds)" if _seeds(results) > 1 else "configuration",
              title_fontsize="small")
    return fig


def _y_range(ax, band: pd.DataFrame, static: pd.DataFrame, paper: pd.DataFrame,
             anytime: pd.DataFrame | None) -> float:
    """Sets the y range to follow the curves (mean +- std), the static models and the published numbers,
    with anytime points that lie within one range's height below them; returns the bottom: anytime points
    below it are drawn on the bottom edge with their value (far-off points would squeeze the curves)."""
    values = [band["mean"] - band["std"].fillna(0), band["mean"] + band["std"].fillna(0),
              static["accuracy"] - static["std"].fillna(0), static["accuracy"] + static["std"].fillna(0),
              paper["accuracy"]]
    core = pd.concat([v for v in values if len(v)]).dropna() if any(len(v) for v in values) else pd.Series()
    if core.empty:
        return -np.inf
    low, high = float(core.min()), float(core.max())
    span = max(high - low, 0.5)
    if anytime is not None and len(anytime):
        near = anytime["accuracy"][anytime["accuracy"] >= low - span]
        if len(near):
            low, high = min(low, float((near - anytime.loc[near.index, "std"].fillna(0)).min())), max(
                high, float(near.max()))
    pad = 0.06 * max(high - low, 0.5)
    ax.set_ylim(low - pad, high + pad)
    return low - pad


def _seeds(results: Results) -> int:
    return int(results.runs.groupby("config").size().max())


def _data_suffix(results: Results) -> str:
    if "data.name" not in results.runs:
        return ""
    names = sorted(set(results.runs["data.name"].astype(str)))
    return f" on {', '.join(names)}" if names else ""


def _few_ticks(ax, n: int = 4) -> None:
    """At most ``n`` x ticks: long GMACs labels of narrow panels would run into each other."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(n))


MAX_COLUMNS = 4  # panels per row: no figure wider than about 2,600 px at the report's 150 dpi


def wrapped_panels(groups: Sequence[Sequence], width: float, height: float, ncols: int = MAX_COLUMNS,
                   sharex: bool = True, extra_height: float = 0.9):
    """A figure with one panel per key of ``groups``: each group starts a new row and wraps after ``ncols``
    panels (a model with 7 exits takes two rows of 4 and 3). Returns ``(fig, {key: ax}, rows)`` where
    ``rows[g]`` lists the axes of group g."""
    ncols = max(1, min(ncols, max((len(g) for g in groups), default=1)))
    layout = []  # (row, column) of each panel, group by group
    row = 0
    for group in groups:
        for i in range(len(group)):
            layout.append((row + i // ncols, i % ncols))
        row += math.ceil(len(group) / ncols) if len(group) else 0
    fig = new_figure(width * ncols + 0.4, height * max(row, 1) + extra_height)
    grid = fig.add_gridspec(max(row, 1), ncols)
    axes, rows, first = {}, [], None
    keys = [key for group in groups for key in group]
    for key, (r, c) in zip(keys, layout):
        ax = fig.add_subplot(grid[r, c], sharex=first if sharex else None)
        first = first or ax
        axes[key] = ax
    for group in groups:
        rows.append([axes[key] for key in group])
    return fig, axes, rows


def _panel_grid(n: int, width: float = 4.0, height: float = 3.0, ncols: int = 3):
    ncols = max(1, min(ncols, n, MAX_COLUMNS))
    nrows = math.ceil(n / ncols)
    fig = new_figure(width * ncols, height * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat[:n]


def plot_exit_shares(results: Results, shares: pd.DataFrame | None = None):
    """Share of test samples leaving at each exit against expected cost, one panel per non-static
    configuration (mean over seeds of each operating point). ``None`` when no run has exit shares."""
    shares = exit_shares(results) if shares is None else shares
    configs = [c for c in results.dynamic_configs if c in set(shares["config"])]
    if not configs:
        return None
    colors = _exit_colors(results.exit_names)
    fig, axes = _panel_grid(len(configs))
    for ax, config in zip(axes, configs):
        mean = shares[shares["config"] == config].groupby(["point", "exit"], sort=False)[
            ["test_expected_cost", "share"]].mean().reset_index()
        table = mean.pivot(index="point", columns="exit", values="share")
        names = [n for n in results.exit_names if n in table.columns]
        cost = mean.groupby("point")["test_expected_cost"].mean().reindex(table.index)
        order = np.argsort(cost.to_numpy(), kind="stable")
        ax.stackplot(cost.to_numpy()[order], *[table[n].to_numpy()[order] for n in names],
                     labels=names, colors=[colors[n] for n in names], alpha=0.85)
        ax.set_title(config, fontsize="medium")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    return _label_exit_panels(fig, axes, "test samples leaving (%)",
                              f"{results.name}: where test samples leave, per operating point")


def _label_exit_panels(fig, axes, ylabel: str, title: str):
    """Cost on x and ``ylabel`` on y in every panel, one legend of the exits below, ``title`` above."""
    for ax in axes:
        _few_ticks(ax)
        ax.set_xlabel(COST_LABEL, fontsize="small")
        ax.set_ylabel(ylabel, fontsize="small")
        ax.tick_params(labelbottom=True, labelleft=True)
    legend = {}  # every panel's exits, once each: mixed families have different exits in different panels
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(len(legend), MAX_COLUMNS + 2),
               title="exit")
    fig.suptitle(title)
    return fig


def plot_exit_accuracy(results: Results, behaviour: pd.DataFrame | None = None):
    """Accuracy of the test samples leaving at each exit against expected cost, one panel per non-static
    configuration, with the overall accuracy dashed. ``None`` when no run has logits and thresholds."""
    behaviour = exit_accuracy(results) if behaviour is None else behaviour
    configs = [c for c in results.dynamic_configs if c in set(behaviour["config"])]
    if not configs:
        return None
    colors = _exit_colors(results.exit_names)
    fig, axes = _panel_grid(len(configs))
    for ax, config in zip(axes, configs):
        rows = behaviour[behaviour["config"] == config]
        mean = rows.groupby(["point", "exit"], sort=False)[["test_expected_cost", "accuracy"]].mean().reset_index()
        for name in [n for n in results.exit_names if n in set(mean["exit"])]:
            line = mean[mean["exit"] == name].sort_values("test_expected_cost", kind="stable")
            ax.plot(line["test_expected_cost"], line["accuracy"], ".-", color=colors[name], label=name, lw=1.2)
        curve = results.curves[results.curves["config"] == config].groupby("point")[
            ["test_expected_cost", "test_accuracy"]].mean().sort_values("test_expected_cost")
        ax.plot(curve["test_expected_cost"], curve["test_accuracy"], "--", color="black", lw=1.2, label="all")
        ax.set_title(config, fontsize="medium")
        ax.grid(alpha=0.3)
    return _label_exit_panels(fig, axes, "accuracy of leaving samples (%)",
                              f"{results.name}: accuracy of the samples leaving at each exit")


def plot_confidence_histograms(results: Results, hist: pd.DataFrame | None = None):
    """Max softmax probability per configuration (rows) and exit (columns), correct and wrong test
    samples stacked, in % of the samples. ``None`` when no run has logits."""
    hist = confidence_histograms(results) if hist is None else hist
    configs = [c for c in results.configs if c in set(hist["config"])]
    if not configs:
        return None
    groups = [[(config, name) for name in results.exit_names
               if ((hist["config"] == config) & (hist["exit"] == name)).any()] for config in configs]
    fig, axes, _ = wrapped_panels(groups, 2.9, 2.0)
    for (config, name), ax in axes.items():
        rows = hist[(hist["config"] == config) & (hist["exit"] == name)]
        width = rows["bin_high"] - rows["bin_low"]
        total = float(rows["samples"].iloc[0])
        right, wrong = rows["correct"] * 100 / total, rows["wrong"] * 100 / total
        ax.bar(rows["bin_low"], right, width=width, align="edge", color="tab:green", alpha=0.8, label="correct")
        ax.bar(rows["bin_low"], wrong, width=width, bottom=right, align="edge", color="tab:red", alpha=0.8,
               label="wrong")
        accuracy = rows["correct"].sum() * 100 / total
        ax.set_title(f"{config}: {name} ({accuracy:.1f} %)", fontsize="small")
        ax.tick_params(labelsize="small", labelbottom=True)
        ax.set_xlim(0, 1)
        ax.set_ylabel("samples (%)", fontsize="small")
        ax.set_xlabel("max softmax probability", fontsize="small")
    handles = next(iter(axes.values())).get_legend_handles_labels()
    fig.legend(*handles, loc="outside lower center", ncols=2)
    fig.suptitle(f"{results.name}: confidence of each exit on the test split (seeds pooled)")
    return fig
