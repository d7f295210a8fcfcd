"""The ablation table of an experiment (mean and standard deviation over seeds, per configuration) and
the per-run metrics behind it, as a frame, Markdown or LaTeX; the mean curve of each configuration.

Accuracy at a budget and the AUC come from :mod:`dynexit.curves`: interpolated along each run's curve,
never extrapolated (NaN outside it). Costs are GMACs, accuracies percent.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dynexit.analysis.results import Results
from dynexit.curves import area_under_curve, interpolate

log = logging.getLogger(__name__)


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

DEFAULT_BUDGETS = 5  # budgets a report chooses when given none


def default_budgets(results: Results, count: int = DEFAULT_BUDGETS) -> list[float]:
    """``count`` budgets spread evenly over the common cost range of the multi-exit curves (at the middles
    of ``count`` equal parts, rounded to a tenth of their spacing), where every such configuration has a value and where
    methods differ; none when the curves share no range. (The spec's ``eval.budgets`` are runs.csv's
    ``acc_at_<budget>`` columns; a report takes them only when given as budgets.)"""
    low, high = common_cost_range(results)
    if not low < high:
        log.warning("the multi-exit curves share no cost range; no default budgets")
        return []
    step = (high - low) / count
    decimals = max(0, 1 - int(np.floor(np.log10(step))))  # round to a tenth of the spacing: still distinct
    return [round(low + (i + 0.5) * step, decimals) for i in range(count)]


def budget_column(budget: float) -> str:
    return f"acc_at_{budget:g}"


POSITION = "position_"  # exit columns by position (mixed families): acc_position_1, share_position_1, ...


def exit_labels(results: Results) -> tuple[list[str], bool]:
    """The ablation table's exit columns and whether they are positions. One family (every multi-exit
    configuration has the same exits): the exit names, a static model's exit among them only if the family
    has it. Mixed families: positions ``position_1`` .. ``position_K`` (exit 1..K of each model)."""
    orders = list(dict.fromkeys(tuple(results.run_exits(rid)) for rid in results.runs["run_id"]
                                if len(results.run_exits(rid)) > 1))
    if not orders:
        return list(results.exit_names), False
    if len(orders) == 1:
        return list(orders[0]), False
    return [f"{POSITION}{k + 1}" for k in range(max(len(o) for o in orders))], True


def run_metrics(results: Results, budgets: Sequence[float] | None = None,
                auc_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """One row per run: ``config``, ``run_id``, ``seed``, ``params``, ``acc_<exit>``/``gmacs_<exit>``,
    ``acc_final``/``gmacs_final``, ``acc_at_<budget>`` (interpolated along the run's curve, NaN outside
    it) and ``auc`` (mean accuracy over ``auc_range``, default :func:`common_cost_range`; NaN for a
    static run)."""
    budgets = default_budgets(results) if budgets is None else list(budgets)
    low, high = auc_range if auc_range is not None else common_cost_range(results)
    by_position = exit_labels(results)[1]
    rows = []
    for run in results.runs.to_dict("records"):
        rid = run["run_id"]
        curve = results.curve(rid)
        row = {"config": run["config"], "run_id": rid, "seed": run["seed"],
               "params": float(run.get("params", np.nan))}
        names = results.run_exits(rid)
        for name in names:
            row[f"acc_{name}"] = float(run[f"acc_{name}"])
            row[f"gmacs_{name}"] = float(run[f"gmacs_{name}"])
        last = names[-1]
        row["acc_final"], row["gmacs_final"] = row[f"acc_{last}"], row[f"gmacs_{last}"]
        if by_position and len(names) > 1:  # a static model has no exits to line up: its accuracy is the final
            for k, name in enumerate(names, 1):
                row[f"acc_{POSITION}{k}"] = row[f"acc_{name}"]
                row[f"gmacs_{POSITION}{k}"] = row[f"gmacs_{name}"]
                row[f"share_{POSITION}{k}"] = row[f"gmacs_{name}"] / row["gmacs_final"] * 100
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
    exits, by_position = exit_labels(results)
    metrics = ([f"acc_{e}" for e in exits] + ["acc_final"]
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
        for e in exits:
            for column in (f"gmacs_{e}", f"share_{e}") if by_position else (f"gmacs_{e}",):
                row[column] = float(runs[column].mean(skipna=False)) if column in runs else np.nan
        row["gmacs_final"] = float(runs["gmacs_final"].mean())
        reference = reference_config(results, config)
        for column in ("auc", "acc_final"):
            mean, std = _paired_difference(runs, per_run[per_run["config"] == reference], column) \
                if reference is not None else (float("nan"), float("nan"))
            row[f"delta_{column}"], row[f"delta_{column}_std"] = mean, std
        rows.append(row)
    table = pd.DataFrame(rows)
    order = (["config", "variant", *results.config_keys, "static", "seeds", "params"]
             + [c for e in exits for c in (f"acc_{e}", f"acc_{e}_std", f"gmacs_{e}")
                + ((f"share_{e}",) if by_position else ())]
             + ["acc_final", "acc_final_std", "gmacs_final"]
             + [c for b in budgets for c in (budget_column(b), f"{budget_column(b)}_std")]
             + ["auc", "auc_std", "delta_auc", "delta_auc_std", "delta_acc_final", "delta_acc_final_std"])
    table = table[order]
    seeds = sorted(set(table["seeds"]))
    table.attrs.update(exits=exits, by_position=by_position, budgets=budgets, auc_range=tuple(auc_range),
                       reference=results.reference,
                       notes=_notes(results, budgets, auc_range, seeds, by_position))
    return table


def reference_config(results: Results, config: str) -> str | None:
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
           seeds: list[int], by_position: bool = False) -> list[str]:
    low, high = auc_range
    seed_text = " or ".join(str(s) for s in seeds)
    notes = [f"Mean ± standard deviation over seeds ({seed_text} per configuration; no deviation with one "
             "seed). Accuracies in %, costs in GMACs per image."]
    if by_position:
        notes.append("Exit columns by position (the models' exits have different names): exit k is each model's "
                     "k-th exit alone (anytime prediction); its cost as a share (%) of the model's final exit's "
                     "cost. Blank: the model has no such exit; a static model's accuracy is its final accuracy.")
    else:
        notes.append("Exit columns: each exit alone (anytime prediction); its cost is cumulative. Blank: the "
                     "model has no such exit.")
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
    by_position = table.attrs.get("by_position", False)
    out = pd.DataFrame({"Configuration": table["config"], "Params": table["params"].map(_fmt_params)})
    for e in exits:
        label = f"Exit {e[len(POSITION):]}" if by_position else e
        out[f"{label} acc. (%)"] = [_fmt(m, s, digits) for m, s in zip(table[f"acc_{e}"], table[f"acc_{e}_std"])]
        if by_position:
            out[f"{label} cost (%)"] = [f"{g:.0f}" if np.isfinite(g) else "" for g in table[f"share_{e}"]]
        else:
            out[f"{label} GMACs"] = [f"{g:.4g}" if np.isfinite(g) else "" for g in table[f"gmacs_{e}"]]
    out["Final acc. (%)"] = [_fmt(m, s, digits) for m, s in zip(table["acc_final"], table["acc_final_std"])]
    out["Final GMACs"] = [f"{g:.4g}" if np.isfinite(g) else "" for g in table["gmacs_final"]]
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
    return markdown_table(format_ablation(table, digits), table.attrs.get("notes", []))


def markdown_table(shown: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """Display strings as a GitHub Markdown table followed by numbered ``notes``."""
    lines = ["| " + " | ".join(shown.columns) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(shown.columns))) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
              for row in shown.itertuples(index=False)]
    return "\n".join(lines + [""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "–": "--", "▲": r"$\uparrow$", "▼": r"$\downarrow$"}


def _latex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, digits: int = 2) -> str:
    """The ablation table as a LaTeX ``tabular`` (booktabs) with its footnotes below."""
    return latex_table(format_ablation(table, digits), table.attrs.get("notes", []))


def latex_table(shown: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """Display strings as a LaTeX ``tabular`` (booktabs) with numbered ``notes`` below."""
    n = len(shown.columns)
    lines = [r"\begin{tabular}{l" + "r" * (n - 1) + "}", r"\toprule",
             " & ".join(_latex(c) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
    lines.append(r"\bottomrule")
    lines += [rf"\multicolumn{{{n}}}{{l}}{{\footnotesize {i}. {_latex(note)}}} \\"
              for i, note in enumerate(notes, 1)]
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"
