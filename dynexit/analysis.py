"""An experiment's results turned into budgeted accuracy curves, ablation tables and exit-behaviour plots.

Everything starts from :func:`load_results` (``runs.csv``, ``curves.csv``, ``experiment.yaml`` and, for
exit behaviour, the run folders' logits). A *configuration* is a variant plus every grid key that
varies within it (except the seed); its runs differ only by seed, and every number shown for it is a
mean with a standard deviation over those seeds.

Curves are piecewise linear in (expected cost, test accuracy). They are interpolated, never
extrapolated: outside the cost range a curve covers (for a configuration, the range every one of its
seeds covers) a value is NaN. Costs are GMACs, accuracies percent.

Figures use matplotlib's object API (``matplotlib.figure.Figure``, no pyplot), so they need no display.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

from dynexit.utils import atomic_write, atomic_write_text, staged_folder

log = logging.getLogger(__name__)

RESULTS_ENV = "DYNEXIT_RESULTS"  # the notebooks' results folder
DEFAULT_RESULTS = "results/quickstart"
REFERENCE_VARIANT = "full"
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


# ------------------------------------------------------------------------------------------ loading

@dataclass
class Results:
    """An experiment's results, one row per run (``runs``) and per run and operating point (``curves``).

    Both frames carry a ``config`` column (the configuration's label). ``exits`` has one row per run
    and exit (``accuracy`` of the exit alone, cumulative ``gmacs``). ``configs`` lists the labels in
    display order, the reference (the ``full`` variant, else the first) first.
    """

    path: Path
    name: str
    runs: pd.DataFrame
    curves: pd.DataFrame
    exits: pd.DataFrame
    exit_names: list[str]
    config_keys: list[str]
    configs: list[str]
    static_configs: list[str]
    reference: str
    budgets: list[float]
    spec: dict = field(default_factory=dict)

    @property
    def dynamic_configs(self) -> list[str]:
        """Configurations with a curve (more than one exit), in display order."""
        return [c for c in self.configs if c not in self.static_configs]

    def run_folder(self, run_id: str) -> Path:
        return self.path / "runs" / str(run_id)

    def run_exits(self, run_id: str) -> list[str]:
        """The exits of one run, in exit order."""
        rows = self.exits[self.exits["run_id"] == run_id]
        return rows.sort_values("position")["exit"].tolist()

    def curve(self, run_id: str) -> pd.DataFrame:
        """The operating points of one run, sorted by test cost."""
        return self.curves[self.curves["run_id"] == run_id].sort_values("test_expected_cost")


def find_results_dir(default: str = DEFAULT_RESULTS, env: str = RESULTS_ENV) -> Path:
    """The results folder named by the environment variable ``env`` (else ``default``); a relative path
    is looked up from the working directory and its parents (a notebook runs in ``notebooks/``)."""
    name = os.environ.get(env) or default
    path = Path(name)
    if path.is_absolute():
        return path
    for base in [Path.cwd(), *Path.cwd().parents]:
        if (base / path).is_dir():
            return base / path
    return path


def load_results(results_dir: str | Path) -> Results:
    """Reads an experiment's results folder (``runs.csv``, ``curves.csv``, ``experiment.yaml``)."""
    path = Path(results_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"results folder not found: {path}")
    runs = _read_csv(path / "runs.csv")
    if runs.empty:
        raise ValueError(f"{path / 'runs.csv'} lists no finished run")
    for column in ("run_id", "variant", "seed"):
        if column not in runs.columns:
            raise ValueError(f"{path / 'runs.csv'} has no {column!r} column")
    runs["run_id"] = runs["run_id"].astype(str)
    runs["variant"] = runs["variant"].astype(str)
    spec = _read_spec(path / "experiment.yaml")

    run_exit_names = {rid: _exits_of(row, path / "runs" / rid / "costs.csv")
                      for rid, row in zip(runs["run_id"], runs.to_dict("records"))}
    for rid, names in run_exit_names.items():
        if not names:
            raise ValueError(f"{path / 'runs.csv'}: run {rid} has no acc_<exit>/gmacs_<exit> columns")

    config_keys = _config_keys(runs)
    runs.insert(1, "config", [_label(row, config_keys) for row in runs.to_dict("records")])
    configs, reference = _order_configs(runs, config_keys, list((spec.get("variants") or {}).keys()))
    runs = _in_display_order(runs, configs)
    exit_names = _union_in_order(run_exit_names[rid] for rid in runs["run_id"])
    num_exits = runs["run_id"].map(lambda rid: len(run_exit_names[rid]))
    static = [c for c in configs if (num_exits[runs["config"] == c] == 1).all()]

    curves = _load_curves(path, runs)
    exits = pd.DataFrame([
        {"config": cfg, "run_id": rid, "seed": seed, "exit": name, "position": k,
         "accuracy": float(row[f"acc_{name}"]), "gmacs": float(row[f"gmacs_{name}"])}
        for rid, cfg, seed, row in zip(runs["run_id"], runs["config"], runs["seed"], runs.to_dict("records"))
        for k, name in enumerate(run_exit_names[rid])])
    budgets = [float(c[len("acc_at_"):]) for c in runs.columns if re.fullmatch(r"acc_at_[-+.0-9eE]+", c)]
    return Results(path=path, name=str(spec.get("name") or path.name), runs=runs, curves=curves, exits=exits,
                   exit_names=exit_names, config_keys=config_keys, configs=configs, static_configs=static,
                   reference=reference, budgets=budgets, spec=spec)


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {path.parent} an experiment's results folder?")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _read_spec(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: cannot parse YAML: {err}") from None
    return spec if isinstance(spec, dict) else {}


def _exits_of(row: dict, costs: Path) -> list[str]:
    """A run's exits (those with an accuracy and a cost in runs.csv), in exit order: the order of the
    run's ``costs.csv`` when it has one, else by cumulative cost (ties keep the column order)."""
    names = [k[4:] for k in row if k.startswith("acc_") and k != "acc_final" and not k.startswith("acc_at_")]
    names = [n for n in names if f"gmacs_{n}" in row and _finite(row[f"acc_{n}"]) and _finite(row[f"gmacs_{n}"])]
    if costs.is_file():
        order = [str(e) for e in pd.read_csv(costs).get("exit", pd.Series(dtype=str))]
        if set(names) <= set(order):
            return [n for n in order if n in names]
    return sorted(names, key=lambda n: float(row[f"gmacs_{n}"]))


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _union_in_order(orders: Iterable[list[str]]) -> list[str]:
    """Exit names of all runs: the longest run's order, then names it lacks."""
    out: list[str] = []
    for names in sorted(orders, key=len, reverse=True):
        out += [n for n in names if n not in out]
    return out


def _config_keys(runs: pd.DataFrame) -> list[str]:
    """Identifying columns that split a variant into configurations: the grid keys (the columns
    between ``seed`` and ``params``), model and data names, whichever take several values within a
    variant. Keys that only a variant sets (``model.x2z`` of ``no_x2z``) are part of the variant."""
    cols = list(runs.columns)
    grid = cols[cols.index("seed") + 1: cols.index("params")] if "params" in cols else []
    candidates = [c for c in ["model.name", "data.name", *grid] if c in cols and c != "seed"]
    keys = []
    for key in dict.fromkeys(candidates):
        values = runs[key].astype(str)  # NaN and None count as one value
        if (values.groupby(runs["variant"]).nunique() > 1).any():
            keys.append(key)
    return keys


def _format_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _label(row: dict, keys: Sequence[str]) -> str:
    if not keys:
        return str(row["variant"])
    return f"{row['variant']} (" + ", ".join(f"{k}={_format_value(row[k])}" for k in keys) + ")"


def _order_configs(runs: pd.DataFrame, keys: list[str], spec_variants: list[str]) -> tuple[list[str], str]:
    """Configurations in display order (reference variant first, then the spec's variant order, then
    grid values) and the reference variant."""
    seen = list(dict.fromkeys(runs["variant"]))
    variants = [v for v in spec_variants if v in seen] + [v for v in seen if v not in spec_variants]
    reference = REFERENCE_VARIANT if REFERENCE_VARIANT in variants else variants[0]
    variants.remove(reference)
    variants.insert(0, reference)
    rank = {v: i for i, v in enumerate(variants)}
    table = runs.drop_duplicates("config")[["config", "variant", *keys]].copy()
    table["_rank"] = table["variant"].map(rank)
    table = table.sort_values(["_rank", *keys], kind="stable", key=_sort_key)
    return table["config"].tolist(), reference


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers sort as numbers; a column holding anything else sorts as text."""
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers.notna().sum() == column.notna().sum() else column.astype(str)


def _in_display_order(runs: pd.DataFrame, configs: list[str]) -> pd.DataFrame:
    """Runs sorted by configuration (display order), seed and run id: every table and figure then follows
    a fixed order, whatever the order of runs.csv's rows."""
    rank = {config: i for i, config in enumerate(configs)}
    ordered = runs.assign(_rank=runs["config"].map(rank)).sort_values(["_rank", "seed", "run_id"], kind="stable",
                                                                       key=_sort_key)
    return ordered.drop(columns="_rank").reset_index(drop=True)


def _load_curves(path: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """curves.csv, completed from run folders (``curve.csv``) for runs it lacks; with ``config``."""
    curves = _read_csv(path / "curves.csv") if (path / "curves.csv").is_file() else pd.DataFrame()
    if not curves.empty:
        for column in ("run_id", "test_expected_cost", "test_accuracy"):
            if column not in curves.columns:
                raise ValueError(f"{path / 'curves.csv'} has no {column!r} column")
        curves["run_id"] = curves["run_id"].astype(str)
        curves = curves[curves["run_id"].isin(runs["run_id"])]
    have = set(curves["run_id"]) if not curves.empty else set()
    extra = []
    for rid in runs["run_id"]:
        folder_curve = path / "runs" / rid / "curve.csv"
        if rid not in have and folder_curve.is_file():
            one = pd.read_csv(folder_curve)
            one["run_id"] = rid
            if "point" not in one.columns:
                one["point"] = range(len(one))
            extra.append(one)
    if extra:
        curves = pd.concat([curves, *extra], ignore_index=True)
    missing = sorted(set(runs["run_id"]) - (set(curves["run_id"]) if not curves.empty else set()))
    if missing:
        raise ValueError(f"{path}: no curve for run(s) {', '.join(missing)} (neither in curves.csv nor in "
                         "the run folders)")
    ids = runs[["run_id", "config", "seed"]]
    curves = curves.drop(columns=[c for c in ("config", "seed") if c in curves.columns])
    curves = curves.merge(ids, on="run_id", how="left")
    if "point" not in curves.columns:
        curves["point"] = curves.groupby("run_id").cumcount()
    first = ["run_id", "config", "seed", "point"]
    rank = {rid: i for i, rid in enumerate(runs["run_id"])}  # the runs' order, then each run's points in order
    curves = curves.sort_values(["run_id", "point"], kind="stable",
                                key=lambda column: column.map(rank) if column.name == "run_id" else column)
    return curves[first + [c for c in curves.columns if c not in first]].reset_index(drop=True)


# ------------------------------------------------------------------------------------ curve algebra

def interpolate(x, y, at) -> np.ndarray:
    """``y(x)`` linearly interpolated at ``at``; NaN outside ``[min x, max x]`` (never extrapolated).
    Points with equal ``x`` are averaged."""
    x = np.asarray(x, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    at = np.asarray(at, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0:
        return np.full(at.shape, np.nan)
    xs, inverse = np.unique(x, return_inverse=True)
    ys = np.bincount(inverse, weights=y) / np.bincount(inverse)
    out = np.interp(at, xs, ys)
    out = np.where((at < xs[0]) | (at > xs[-1]), np.nan, out)
    return out


def area_under_curve(x, y, low: float, high: float) -> float:
    """Mean of the piecewise-linear curve ``y(x)`` over ``[low, high]``: its integral divided by
    ``high - low`` (so it reads as a mean accuracy). NaN when the curve does not cover the range."""
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        return float("nan")
    x = np.asarray(x, dtype=float)
    inner = np.unique(x[np.isfinite(x) & (x > low) & (x < high)])
    knots = np.concatenate([[low], inner, [high]])
    values = interpolate(x, y, knots)
    if np.isnan(values).any():
        return float("nan")
    return float(np.trapezoid(values, knots) / (high - low))


def cost_range(curves: pd.DataFrame) -> tuple[float, float]:
    """The cost range every run (curve) in ``curves`` covers: (largest minimum, smallest maximum);
    empty (low > high) when two curves do not overlap."""
    if curves.empty:
        return float("nan"), float("nan")
    per_run = curves.groupby("run_id")["test_expected_cost"].agg(["min", "max"])
    return float(per_run["min"].max()), float(per_run["max"].min())


def common_cost_range(results: Results) -> tuple[float, float]:
    """The cost range every run of every non-static configuration covers (the AUC's range)."""
    return cost_range(results.curves[results.curves["config"].isin(results.dynamic_configs)])


def curve_band(results: Results, configs: Sequence[str] | None = None) -> pd.DataFrame:
    """Budgeted curve of each configuration, mean and standard deviation over seeds.

    Each seed's curve is interpolated onto the costs where any seed has a point, within the range every
    seed covers (never extrapolated). Columns: ``config``, ``cost``, ``mean``, ``std`` (NaN with one
    seed), ``seeds``.
    """
    rows = []
    for config in configs or results.dynamic_configs:
        curves = results.curves[results.curves["config"] == config]
        low, high = cost_range(curves)
        if not low <= high:
            log.warning("%s: the seeds' curves share no cost range; no mean curve", config)
            continue
        x = curves["test_expected_cost"].to_numpy(dtype=float)
        knots = np.unique(x[(x >= low) & (x <= high)])
        values = np.stack([interpolate(c["test_expected_cost"], c["test_accuracy"], knots)
                           for _, c in curves.groupby("run_id")])
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(len(knots), np.nan)
        rows.append(pd.DataFrame({"config": config, "cost": knots, "mean": values.mean(axis=0), "std": std,
                                  "seeds": len(values)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["config", "cost", "mean", "std", "seeds"])


# ------------------------------------------------------------------------------------------- tables

def default_budgets(results: Results) -> list[float]:
    """The spec's ``eval.budgets`` (runs.csv's ``acc_at_<budget>`` columns) when a curve reaches one of
    them; else three budgets at a quarter, half and three quarters of the common cost range."""
    low, high = common_cost_range(results)
    if results.budgets:
        reached = results.curves.groupby("run_id")["test_expected_cost"].agg(["min", "max"])
        if any(((reached["min"] <= b) & (b <= reached["max"])).any() for b in results.budgets):
            return list(results.budgets)
        log.warning("no curve reaches the spec's budgets (%s GMACs); the table uses budgets within the common "
                    "cost range %.4g-%.4g GMACs instead", ", ".join(f"{b:g}" for b in results.budgets), low, high)
    if not low < high:
        return []
    return [float(f"{low + f * (high - low):.3g}") for f in (0.25, 0.5, 0.75)]


def budget_column(budget: float) -> str:
    return f"acc_at_{budget:g}"


def run_metrics(results: Results, budgets: Sequence[float] | None = None,
                auc_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """One row per run: ``config``, ``run_id``, ``seed``, ``params``, ``acc_<exit>``/``gmacs_<exit>``,
    ``acc_final``/``gmacs_final``, ``acc_at_<budget>`` (interpolated along the run's curve, NaN outside
    it) and ``auc`` (mean accuracy over ``auc_range``, default :func:`common_cost_range`; NaN for a
    static run)."""
    budgets = default_budgets(results) if budgets is None else list(budgets)
    low, high = auc_range if auc_range is not None else common_cost_range(results)
    rows = []
    for run in results.runs.to_dict("records"):
        rid = run["run_id"]
        curve = results.curve(rid)
        row = {"config": run["config"], "run_id": rid, "seed": run["seed"],
               "params": float(run.get("params", np.nan))}
        for name in results.run_exits(rid):
            row[f"acc_{name}"] = float(run[f"acc_{name}"])
            row[f"gmacs_{name}"] = float(run[f"gmacs_{name}"])
        last = results.run_exits(rid)[-1]
        row["acc_final"], row["gmacs_final"] = row[f"acc_{last}"], row[f"gmacs_{last}"]
        x, y = curve["test_expected_cost"], curve["test_accuracy"]
        for budget, value in zip(budgets, interpolate(x, y, budgets)):
            row[budget_column(budget)] = float(value)
        static = run["config"] in results.static_configs
        row["auc"] = float("nan") if static else area_under_curve(x, y, low, high)
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_table(results: Results, budgets: Sequence[float] | None = None,
                   auc_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """One row per configuration (reference first): mean and standard deviation over seeds of each
    exit's accuracy (``acc_<exit>``, ``acc_<exit>_std``) and cost (``gmacs_<exit>``), ``params``,
    the final exit's accuracy, test accuracy at fixed ``budgets`` (``acc_at_<budget>``, interpolated,
    NaN where a seed's curve does not reach the budget), ``auc`` (mean accuracy over the common cost
    range of the non-static configurations) and the differences to the reference configuration with
    the same other settings (``delta_auc``, ``delta_acc_final``; paired by seed when the seeds match).

    ``table.attrs`` holds ``budgets``, ``auc_range``, ``reference`` and ``notes`` (footnotes).
    """
    budgets = default_budgets(results) if budgets is None else [float(b) for b in budgets]
    auc_range = auc_range if auc_range is not None else common_cost_range(results)
    per_run = run_metrics(results, budgets, auc_range)
    info = results.runs.drop_duplicates("config").set_index("config")
    metrics = ([f"acc_{e}" for e in results.exit_names] + ["acc_final"]
               + [budget_column(b) for b in budgets] + ["auc"])
    rows = []
    for config in results.configs:
        runs = per_run[per_run["config"] == config]
        row = {"config": config, "variant": info.at[config, "variant"],
               **{k: info.at[config, k] for k in results.config_keys},
               "static": config in results.static_configs, "seeds": len(runs),
               "params": float(runs["params"].mean())}
        for column in metrics:
            values = runs[column] if column in runs else pd.Series(np.nan, index=runs.index)
            row[column] = float(values.mean(skipna=False))
            row[f"{column}_std"] = float(values.std(ddof=1, skipna=False)) if len(values) > 1 else float("nan")
        for e in results.exit_names:
            row[f"gmacs_{e}"] = float(runs[f"gmacs_{e}"].mean(skipna=False)) if f"gmacs_{e}" in runs else np.nan
        row["gmacs_final"] = float(runs["gmacs_final"].mean())
        reference = _reference_config(results, config)
        for column in ("auc", "acc_final"):
            mean, std = _paired_difference(runs, per_run[per_run["config"] == reference], column) \
                if reference is not None else (float("nan"), float("nan"))
            row[f"delta_{column}"], row[f"delta_{column}_std"] = mean, std
        rows.append(row)
    table = pd.DataFrame(rows)
    order = (["config", "variant", *results.config_keys, "static", "seeds", "params"]
             + [c for e in results.exit_names for c in (f"acc_{e}", f"acc_{e}_std", f"gmacs_{e}")]
             + ["acc_final", "acc_final_std", "gmacs_final"]
             + [c for b in budgets for c in (budget_column(b), f"{budget_column(b)}_std")]
             + ["auc", "auc_std", "delta_auc", "delta_auc_std", "delta_acc_final", "delta_acc_final_std"])
    table = table[order]
    seeds = sorted(set(table["seeds"]))
    table.attrs.update(exits=list(results.exit_names), budgets=budgets, auc_range=tuple(auc_range),
                       reference=results.reference,
                       notes=_notes(results, budgets, auc_range, seeds))
    return table


def _reference_config(results: Results, config: str) -> str | None:
    """The reference variant's configuration with the same other settings as ``config``."""
    runs = results.runs
    row = runs[runs["config"] == config].iloc[0]
    same = runs["variant"] == results.reference
    for key in results.config_keys:
        same &= runs[key].astype(str) == str(row[key])
    matches = runs.loc[same, "config"].unique()
    return str(matches[0]) if len(matches) else None


def _paired_difference(runs: pd.DataFrame, reference: pd.DataFrame, column: str) -> tuple[float, float]:
    """Mean and std of ``column`` minus the reference's: over seeds, paired when both have the same
    seeds (each once); otherwise the difference of the means, without a std."""
    if runs.empty or reference.empty:
        return float("nan"), float("nan")
    mine, theirs = runs.set_index("seed")[column], reference.set_index("seed")[column]
    if mine.index.is_unique and theirs.index.is_unique and set(mine.index) == set(theirs.index):
        diff = mine - theirs.reindex(mine.index)
        std = float(diff.std(ddof=1, skipna=False)) if len(diff) > 1 else float("nan")
        return float(diff.mean(skipna=False)), std
    return float(mine.mean(skipna=False) - theirs.mean(skipna=False)), float("nan")


def _notes(results: Results, budgets: Sequence[float], auc_range: tuple[float, float],
           seeds: list[int]) -> list[str]:
    low, high = auc_range
    seed_text = " or ".join(str(s) for s in seeds)
    notes = [f"Mean ± standard deviation over seeds ({seed_text} per configuration; no deviation with one "
             "seed). Accuracies in %, costs in GMACs per image.",
             "Exit columns: each exit alone (anytime prediction); its cost is cumulative. Blank: the model "
             "has no such exit."]
    if budgets:
        notes.append("Acc. @ budget: test accuracy interpolated along the budgeted curve, never extrapolated: "
                     "blank where the budget lies outside the cost range that every seed's curve covers.")
    if low < high:
        notes.append(f"AUC: mean test accuracy of the budgeted curve over {low:.4g}-{high:.4g} GMACs, the cost "
                     "range every non-static configuration covers (area divided by the range's width). "
                     "Blank for a static backbone (one point).")
    else:
        notes.append("AUC: blank, the non-static configurations share no cost range.")
    notes.append(f"Δ: difference to {results.reference!r} with the same other settings, per seed when the "
                 "seeds match.")
    return notes


def _fmt(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return ""
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if np.isfinite(std) else "")


def _fmt_params(value: float) -> str:
    if not np.isfinite(value):
        return ""
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"


def format_ablation(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """The ablation table as display strings: one column per quantity, ``mean ± std``, blanks for NaN."""
    exits = table.attrs.get("exits") or [c[len("gmacs_"):] for c in table.columns
                                          if c.startswith("gmacs_") and c != "gmacs_final"]
    budgets = table.attrs.get("budgets", [])
    out = pd.DataFrame({"Configuration": table["config"], "Params": table["params"].map(_fmt_params)})
    for e in exits:
        out[f"{e} acc. (%)"] = [_fmt(m, s, digits) for m, s in zip(table[f"acc_{e}"], table[f"acc_{e}_std"])]
        out[f"{e} GMACs"] = [f"{g:.4g}" if np.isfinite(g) else "" for g in table[f"gmacs_{e}"]]
    for b in budgets:
        col = budget_column(b)
        out[f"Acc. @ {b:g} GMACs (%)"] = [_fmt(m, s, digits) for m, s in zip(table[col], table[f"{col}_std"])]
    out["AUC (%)"] = [_fmt(m, s, digits) for m, s in zip(table["auc"], table["auc_std"])]
    out["Δ AUC"] = [_signed(m, s, digits) for m, s in zip(table["delta_auc"], table["delta_auc_std"])]
    out["Δ final acc."] = [_signed(m, s, digits) for m, s in
                           zip(table["delta_acc_final"], table["delta_acc_final_std"])]
    return out


def _signed(mean: float, std: float, digits: int) -> str:
    text = _fmt(mean, std, digits)
    return ("+" + text) if text and mean >= 0 and not text.startswith("-") else text


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """The ablation table as a GitHub Markdown table followed by its footnotes."""
    shown = format_ablation(table, digits)
    lines = ["| " + " | ".join(shown.columns) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(shown.columns))) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
              for row in shown.itertuples(index=False)]
    notes = table.attrs.get("notes", [])
    return "\n".join(lines + [""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "–": "--"}


def _latex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, digits: int = 2) -> str:
    """The ablation table as a LaTeX ``tabular`` (booktabs) with its footnotes below."""
    shown = format_ablation(table, digits)
    n = len(shown.columns)
    lines = [r"\begin{tabular}{l" + "r" * (n - 1) + "}", r"\toprule",
             " & ".join(_latex(c) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
    lines.append(r"\bottomrule")
    lines += [rf"\multicolumn{{{n}}}{{l}}{{\footnotesize {i}. {_latex(note)}}} \\"
              for i, note in enumerate(table.attrs.get("notes", []), 1)]
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- exit behaviour

def _exit_column(frame: pd.DataFrame, prefix: str, name: str, position: int) -> str | None:
    """``<prefix><exit name>``, or ``<prefix><exit index>`` when the curve was written without names."""
    for column in (f"{prefix}{name}", f"{prefix}{position}"):
        if column in frame.columns:
            return column
    return None


def exit_shares(results: Results) -> pd.DataFrame:
    """Share of test samples (%) leaving at each exit, per run and operating point: ``config``,
    ``run_id``, ``seed``, ``point``, ``test_expected_cost``, ``test_accuracy``, ``exit``, ``share``."""
    rows = []
    for rid in results.runs["run_id"]:
        curve, names = results.curve(rid), results.run_exits(rid)
        if len(names) < 2:  # a static run: everything leaves at its only exit
            continue
        for k, name in enumerate(names):
            column = _exit_column(curve, "test_share_", name, k)
            if column is None or curve[column].isna().all():
                continue
            part = curve[["config", "run_id", "seed", "point", "test_expected_cost", "test_accuracy"]].copy()
            part["exit"], part["share"] = name, curve[column].to_numpy(dtype=float) * 100
            rows.append(part)
    columns = ["config", "run_id", "seed", "point", "test_expected_cost", "test_accuracy", "exit", "share"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def _criterion(results: Results, run_id: str) -> str:
    """The confidence criterion a run's thresholds were set with (its config.yaml; else the spec's)."""
    config = results.run_folder(run_id) / "config.yaml"
    raw = _read_spec(config) if config.is_file() else {}
    value = (raw.get("eval") or {}).get("criterion") or \
        ((results.spec.get("base") or {}).get("eval") or {}).get("criterion")
    return str(value or "max_softmax")


def _load_run_logits(results: Results, run_id: str, split: str):
    from dynexit.logits import load_logits

    path = results.run_folder(run_id) / f"logits_{split}.npz"
    if not path.is_file():
        log.warning("run %s has no %s; skipped", run_id, path.name)
        return None
    return load_logits(path)


def exit_accuracy(results: Results) -> pd.DataFrame:
    """Per run, operating point and exit: the share (%) of test samples leaving there and their accuracy
    (%; NaN where none leaves), recomputed from the run's test logits and the point's thresholds.
    Columns: ``config``, ``run_id``, ``seed``, ``point``, ``test_expected_cost``, ``exit``, ``share``,
    ``accuracy``. Runs without logits or thresholds (static ones) are left out."""
    from dynexit.policies import evaluate_thresholds, scores

    rows = []
    for run in results.runs.to_dict("records"):
        rid, names = run["run_id"], results.run_exits(run["run_id"])
        curve = results.curve(rid)
        columns = [_exit_column(curve, "threshold_", n, k) for k, n in enumerate(names)]
        if len(names) < 2 or None in columns:
            continue
        loaded = _load_run_logits(results, rid, "test")
        if loaded is None:
            continue
        logits, targets = loaded
        if logits.shape[0] != len(names):
            raise ValueError(f"{results.run_folder(rid)}/logits_test.npz has {logits.shape[0]} exits, "
                             f"runs.csv lists {len(names)} ({', '.join(names)})")
        conf, pred = scores(logits, _criterion(results, rid))
        correct = pred == targets[None, :]
        costs = [run[f"gmacs_{n}"] for n in names]
        thresholds = curve[columns].to_numpy(dtype=np.float32)
        for point, cost, accuracy, th in zip(curve["point"], curve["test_expected_cost"], curve["test_accuracy"],
                                             thresholds):
            outcome = evaluate_thresholds(conf, correct, th, costs)
            if abs(outcome.accuracy - accuracy) > 1e-6:
                log.warning("run %s point %s: thresholds give %.4f %% on the test logits, the curve says "
                            "%.4f %%", rid, point, outcome.accuracy, accuracy)
            for name, share, acc in zip(names, outcome.shares, outcome.exit_accuracy):
                rows.append({"config": run["config"], "run_id": rid, "seed": run["seed"], "point": point,
                             "test_expected_cost": cost, "exit": name, "share": share * 100,
                             "accuracy": float(acc)})
    return pd.DataFrame(rows, columns=["config", "run_id", "seed", "point", "test_expected_cost", "exit",
                                       "share", "accuracy"])


def max_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest softmax probability and predicted class of logits (exits, samples, classes)."""
    logits = np.asarray(logits, dtype=np.float32)
    conf = np.empty(logits.shape[:2], dtype=np.float32)
    for k in range(logits.shape[0]):  # one exit at a time bounds the temporary memory
        z = logits[k] - logits[k].max(axis=-1, keepdims=True)
        conf[k] = 1.0 / np.exp(z).sum(axis=-1)
    return conf, logits.argmax(axis=-1)


def confidence_histograms(results: Results, bins: int = 20, split: str = "test") -> pd.DataFrame:
    """Histogram of the max softmax probability per configuration and exit (seeds pooled), split into
    correctly and wrongly classified samples. Columns: ``config``, ``exit``, ``bin_low``, ``bin_high``,
    ``correct``, ``wrong`` (counts), ``samples`` (all samples of that configuration and exit)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts: dict[tuple[str, str], np.ndarray] = {}
    for run in results.runs.to_dict("records"):
        loaded = _load_run_logits(results, run["run_id"], split)
        if loaded is None:
            continue
        logits, targets = loaded
        conf, pred = max_softmax(logits)
        for k, name in enumerate(results.run_exits(run["run_id"])[: logits.shape[0]]):
            right = pred[k] == targets
            hist = np.stack([np.histogram(conf[k][right], edges)[0], np.histogram(conf[k][~right], edges)[0]])
            key = (run["config"], name)
            counts[key] = counts.get(key, 0) + hist
    rows = [pd.DataFrame({"config": config, "exit": name, "bin_low": edges[:-1], "bin_high": edges[1:],
                          "correct": hist[0], "wrong": hist[1], "samples": int(hist.sum())})
            for (config, name), hist in counts.items()]
    columns = ["config", "exit", "bin_low", "bin_high", "correct", "wrong", "samples"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


# ------------------------------------------------------------------------------------------ figures

def _figure(width: float, height: float):
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
    fig = _figure(8.0 if paper.empty else 9.0, 4.8) if ax is None else ax.figure
    ax = ax if ax is not None else fig.add_subplot()
    colors = config_colors(results)
    band = curve_band(results)
    exits = results.exits.groupby(["config", "exit"], sort=False).agg(
        gmacs=("gmacs", "mean"), accuracy=("accuracy", "mean"), std=("accuracy", "std")).reset_index()
    handles, labels = [], []
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
            ax.errorbar(points["gmacs"], points["accuracy"], yerr=points["std"].fillna(0), fmt="o", ms=5,
                        mfc="none", color=color, capsize=2, lw=1, zorder=3)
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


def _panel_grid(n: int, width: float = 4.0, height: float = 3.0, ncols: int = 3):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(width * ncols, height * nrows + 0.6)
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
    for ax in axes:
        _few_ticks(ax)
        ax.set_xlabel(COST_LABEL, fontsize="small")
        ax.set_ylabel("test samples leaving (%)", fontsize="small")
        ax.tick_params(labelbottom=True, labelleft=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), title="exit")
    fig.suptitle(f"{results.name}: where test samples leave, per operating point")
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
    for ax in axes:
        _few_ticks(ax)
        ax.set_xlabel(COST_LABEL, fontsize="small")
        ax.set_ylabel("accuracy of leaving samples (%)", fontsize="small")
        ax.tick_params(labelbottom=True, labelleft=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), title="exit")
    fig.suptitle(f"{results.name}: accuracy of the samples leaving at each exit")
    return fig


def plot_confidence_histograms(results: Results, hist: pd.DataFrame | None = None):
    """Max softmax probability per configuration (rows) and exit (columns), correct and wrong test
    samples stacked, in % of the samples. ``None`` when no run has logits."""
    hist = confidence_histograms(results) if hist is None else hist
    configs = [c for c in results.configs if c in set(hist["config"])]
    if not configs:
        return None
    names = [n for n in results.exit_names if n in set(hist["exit"])]
    fig = _figure(2.9 * len(names) + 0.4, 2.0 * len(configs) + 0.9)
    axes = fig.subplots(len(configs), len(names), sharex=True, squeeze=False)
    for i, config in enumerate(configs):
        for j, name in enumerate(names):
            ax = axes[i, j]
            rows = hist[(hist["config"] == config) & (hist["exit"] == name)]
            if rows.empty:
                ax.set_visible(False)
                continue
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
            if j == 0 or not axes[i, j - 1].get_visible():
                ax.set_ylabel("samples (%)", fontsize="small")
            if i == len(configs) - 1 or not _has_panel(hist, configs, i + 1, name):
                ax.set_xlabel("max softmax probability", fontsize="small")
    handles = [h for h in axes.flat if h.get_visible()][0].get_legend_handles_labels()
    fig.legend(*handles, loc="outside lower center", ncols=2)
    fig.suptitle(f"{results.name}: confidence of each exit on the test split (seeds pooled)")
    return fig


def _has_panel(hist: pd.DataFrame, configs: list[str], row: int, name: str) -> bool:
    return row < len(configs) and bool(((hist["config"] == configs[row]) & (hist["exit"] == name)).any())


# ------------------------------------------------------------------------------------------- report

# No creation date in a figure, and fixed SVG ids (random by default): the same figure, the same bytes.
_STABLE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}
_SVG_SALT = "dynexit"


def save_figure(fig, path: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Writes ``fig`` as ``path.<format>`` for each format, atomically and byte-stable (rendering the same
    figure again gives the same bytes); returns the paths."""
    import matplotlib

    out = []
    for fmt in formats:
        target = Path(path).with_suffix(f".{fmt}")
        with matplotlib.rc_context({"svg.hashsalt": _SVG_SALT}):
            atomic_write(target, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight",
                                                                  metadata=_STABLE_METADATA.get(fmt)))
        out.append(target)
    return out


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 formats: Sequence[str] = ("png", "pdf"), budgets: Sequence[float] | None = None,
                 published: bool | str = "auto") -> dict[str, list[Path]]:
    """Writes an experiment's figures and tables into ``out_dir`` (default ``RESULTS_DIR/report``):
    budgeted curves, exit shares, exit accuracy and confidence histograms (each in ``formats``), the
    ablation table (CSV, Markdown, LaTeX) and the data behind the figures (CSV). All or nothing: every file
    is rendered into a staging folder first and moved into ``out_dir`` only when all succeeded; the same
    results give the same bytes. Returns ``{item: [paths]}``."""
    for fmt in formats:
        if fmt not in ("png", "pdf", "svg"):
            raise ValueError(f"figure format {fmt!r} is not one of png, pdf, svg")
    results = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else results.path / "report"
    with staged_folder(out) as stage:
        written = _render_report(results, stage, formats, budgets, published)
    return {item: [out / path.name for path in paths] for item, paths in written.items()}


def _render_report(results: Results, out: Path, formats: Sequence[str], budgets: Sequence[float] | None,
                   published: bool | str) -> dict[str, list[Path]]:
    """Writes every file of the report into ``out``; returns ``{item: [paths]}``."""
    written: dict[str, list[Path]] = {}

    def csv(name: str, frame: pd.DataFrame) -> Path:
        path = out / f"{name}.csv"
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
        return path

    table = ablation_table(results, budgets)
    written["ablation table"] = [csv("ablation", table)]
    atomic_write_text(out / "ablation.md", to_markdown(table))
    atomic_write_text(out / "ablation.tex", to_latex(table))
    written["ablation table"] += [out / "ablation.md", out / "ablation.tex"]
    written["per-run metrics"] = [csv("run_metrics", run_metrics(results, table.attrs["budgets"],
                                                                 table.attrs["auc_range"]))]

    fig = plot_budgeted_curves(results, published=published)
    written["budgeted curves"] = save_figure(fig, out / "budgeted_curves", formats)
    written["budgeted curves"].append(csv("curve_bands", curve_band(results)))

    shares = exit_shares(results)
    behaviour = exit_accuracy(results)
    hist = confidence_histograms(results)
    for item, name, fig, data in (("exit shares", "exit_shares", plot_exit_shares(results, shares), shares),
                                  ("exit accuracy", "exit_accuracy", plot_exit_accuracy(results, behaviour),
                                   behaviour),
                                  ("confidence histograms", "confidence", plot_confidence_histograms(results, hist),
                                   hist)):
        if fig is None:
            log.info("%s: nothing to plot (no multi-exit run with the files it needs)", item)
            continue
        written[item] = save_figure(fig, out / name, formats) + [csv(name, data)]
    return written
