"""Who wins where: each configuration's accuracy at fixed budgets with a 95 % bootstrap interval, and its
difference to the reference configuration with an interval and a verdict (``report/budgets.csv``).

Accuracy at a budget is read along each run's budgeted curve as in the ablation table (interpolated between
the two operating points around the budget, never extrapolated) and averaged over seeds. Per test image, the
two points give an outcome: 1 or 0 at each point, mixed with the interpolation's weights, so that the mean
over the images is exactly the interpolated accuracy. The bootstrap resamples test images and seeds:

* images: every resample draws the test images with replacement, the same draws for every run evaluated on
  the same test set, so that differences between configurations are paired (the image-to-image variation
  they share cancels);
* seeds: every resample draws each configuration's seeds with replacement, with the same draws for
  configurations that have as many seeds (seed i with seed i: paired when the seeds are the same).

Intervals are the 2.5th and 97.5th percentiles of the resampled values. ``verdict`` is ``level`` when the
difference's interval contains 0, else ``better`` or ``worse``. Everything is vectorized: a resample's
mean over images is one row of a matrix product of image counts (resamples x images) with the per-image
outcomes (images x configurations, seeds and budgets).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dynexit.analysis.results import Results
from dynexit.analysis.tables import latex_table, markdown_table, reference_config, run_metrics
from dynexit.curves import interpolation_points

log = logging.getLogger(__name__)

RESAMPLES = 1000
LEVEL = 0.95
BETTER, WORSE, LEVEL_VERDICT = "better", "worse", "level"
BUDGET_COLUMNS = ["configuration", "budget_gmacs", "accuracy", "ci_low", "ci_high", "delta", "delta_ci_low",
                  "delta_ci_high", "verdict"]
MARKS = {BETTER: "▲", WORSE: "▼", LEVEL_VERDICT: "="}  # how the Markdown and HTML tables mark a verdict


# ------------------------------------------------------------------------------------- the bootstrap

def image_counts(rng: np.random.Generator, resamples: int, images: int) -> np.ndarray:
    """How often each image is drawn in each resample: (resamples, images) float32, rows summing to
    ``images`` (one draw of ``images`` images with replacement per row)."""
    draws = rng.integers(0, images, size=(resamples, images))
    draws += np.arange(resamples)[:, None] * images
    return np.bincount(draws.reshape(-1), minlength=resamples * images).reshape(resamples, images).astype(
        np.float32)


def bootstrap_accuracy(outcomes: Sequence[np.ndarray | Sequence[np.ndarray]], test_sets: Sequence | None = None,
                       resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of each configuration's accuracy (%, mean over seeds) at each budget.

    ``outcomes[c]``: configuration c's per-image outcomes, (seeds, budgets, images) or one (budgets, images)
    array per seed (NaN where a seed's curve does not reach a budget). ``test_sets[c]``: the test set each
    of its seeds was evaluated on, one label for all its seeds or one per seed; runs on the same test set
    share the image draws (default: one test set for all, which needs equal image counts). Returns
    (resamples, configurations, budgets) float64.
    """
    if not len(outcomes):
        raise ValueError("no configurations to resample")
    runs = [[np.asarray(v) for v in values] for values in outcomes]
    num_budgets = runs[0][0].shape[0] if runs[0] else 0
    for c, values in enumerate(runs):
        if not values or any(v.ndim != 2 or v.shape[0] != num_budgets for v in values):
            raise ValueError(f"outcomes[{c}] must have shape (seeds, {num_budgets} budgets, images), got "
                             f"{[v.shape for v in values]}")
    test_sets = [0] * len(runs) if test_sets is None else list(test_sets)
    if len(test_sets) != len(runs):
        raise ValueError(f"test_sets has {len(test_sets)} entries for {len(runs)} configurations")
    labels = [list(t) if isinstance(t, (list, tuple)) else [t] * len(runs[c]) for c, t in enumerate(test_sets)]
    rng = np.random.default_rng(seed)
    seed_draws = rng.random((resamples, max(len(v) for v in runs)))  # shared by all configurations
    per_run = [[None] * len(values) for values in runs]
    for test_set in dict.fromkeys(t for ts in labels for t in ts):
        members = [(c, s) for c, ts in enumerate(labels) for s, t in enumerate(ts) if t == test_set]
        images = {runs[c][s].shape[1] for c, s in members}
        if len(images) != 1:
            raise ValueError(f"runs {members} (configuration, seed) share test set {test_set!r} but have "
                             f"{sorted(images)} images")
        n = images.pop()
        counts = image_counts(rng, resamples, n)
        stacked = np.concatenate([runs[c][s] for c, s in members]).astype(np.float32)  # (runs x budgets, n)
        means = (counts @ stacked.T).astype(np.float64) * (100.0 / n)
        for i, (c, s) in enumerate(members):
            per_run[c][s] = means[:, i * num_budgets:(i + 1) * num_budgets]
    out = np.empty((resamples, len(runs), num_budgets))
    for c, values in enumerate(per_run):
        per_seed = np.stack(values, axis=1)  # (resamples, seeds, budgets)
        seeds = per_seed.shape[1]
        drawn = np.floor(seed_draws[:, :seeds] * seeds).astype(np.int64)
        out[:, c] = np.take_along_axis(per_seed, drawn[:, :, None], axis=1).mean(axis=1)
    return out


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of ``samples`` along axis 0 (NaN where any sample is NaN)."""
    tail = (1 - level) / 2
    bad = np.isnan(samples).any(axis=0)
    low, high = np.quantile(np.where(np.isnan(samples), 0.0, samples), [tail, 1 - tail], axis=0)
    return np.where(bad, np.nan, low), np.where(bad, np.nan, high)


def verdicts(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``better`` where the difference's interval lies above 0, ``worse`` below, ``level`` where it contains
    0; empty where the interval is undefined."""
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    out = np.full(low.shape, "", dtype=object)
    defined = np.isfinite(low) & np.isfinite(high)
    out[defined] = LEVEL_VERDICT
    out[defined & (low > 0)] = BETTER
    out[defined & (high < 0)] = WORSE
    return out


# ---------------------------------------------------------------------------------- from the results

def curve_outcomes(curve: pd.DataFrame, logits: np.ndarray, targets: np.ndarray, budgets: Sequence[float],
                   names: Sequence[str], criterion: str = "max_softmax", where: str = "curve") -> np.ndarray:
    """Per-image outcomes (budgets, images) float32 of one curve at ``budgets``: at each budget, the outcome
    (1 correct, 0 wrong) at the two operating points around it (:func:`dynexit.curves.interpolation_points`)
    mixed with the interpolation's weights, so that the mean over images is the interpolated test accuracy
    / 100; NaN outside the curve. Each point is replayed on the test ``logits`` (exits, images, classes) with
    its thresholds (``threshold_<exit>``, by name or position), the curve's ``criterion`` and
    ``temperature_<exit>`` columns (else ``criterion``); a point whose replayed accuracy differs from the
    curve's is an error naming ``where``. A single-exit curve is its exit's outcome."""
    from dynexit.analysis.behaviour import exit_column
    from dynexit.policies import assign_exits, scores

    curve = curve.reset_index(drop=True)
    lower, upper, weight = interpolation_points(curve["test_expected_cost"], curve["test_accuracy"], budgets)
    needed = sorted({int(i) for i in np.r_[lower, upper] if i >= 0})
    if len(names) == 1:
        _, pred = scores(logits)
        correct = {i: pred[0] == targets for i in needed}
    else:
        columns = [exit_column(curve, "threshold_", n, k) for k, n in enumerate(names)]
        if None in columns:
            raise ValueError(f"{where}: no threshold_<exit> columns, so its operating points cannot be replayed "
                             "on the test logits")
        if "criterion" in curve and curve["criterion"].notna().any():
            criterion = str(curve["criterion"].dropna().iloc[0])
        temps = [exit_column(curve, "temperature_", n, k) for k, n in enumerate(names)]
        temperatures = (curve.loc[0, temps].to_numpy(dtype=float)
                        if None not in temps and curve[temps].notna().all().all() else None)
        conf, pred = scores(logits, criterion, temperatures)
        samples = np.arange(len(targets))
        correct = {i: pred[assign_exits(conf, curve.loc[i, columns].to_numpy(dtype=np.float64)), samples] == targets
                   for i in needed}
    for i in needed:
        replayed, recorded = correct[i].mean() * 100.0, float(curve.at[i, "test_accuracy"])
        if abs(replayed - recorded) > 1e-6:
            raise ValueError(f"{where}: operating point {curve.at[i, 'point'] if 'point' in curve else i} gives "
                             f"{replayed:.4f} % on the test logits, the curve says {recorded:.4f} %: the logits "
                             "and the curve disagree")
    out = np.full((len(budgets), len(targets)), np.nan, dtype=np.float32)
    for b, (lo, hi, w) in enumerate(zip(lower, upper, weight)):
        if lo >= 0:
            out[b] = (1 - w) * correct[int(lo)] + w * correct[int(hi)]
    return out


def run_outcomes(results: Results, run_id: str, budgets: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`curve_outcomes` of one run (its curve and its folder's test logits) and its test targets; None
    when the run folder has no test logits."""
    from dynexit.analysis.behaviour import load_run_logits, run_criterion

    loaded = load_run_logits(results, run_id, "test")
    if loaded is None:
        return None
    logits, targets = loaded
    names = results.run_exits(run_id)
    folder = results.run_folder(run_id)
    if logits.shape[0] != len(names):
        raise ValueError(f"{folder}/logits_test.npz has {logits.shape[0]} exits, runs.csv lists {len(names)} "
                         f"({', '.join(names)})")
    return curve_outcomes(results.curve(run_id), logits, targets, budgets, names, run_criterion(results, run_id),
                          f"run {run_id} ({folder})"), targets


def budget_table(results: Results, budgets: Sequence[float], resamples: int = RESAMPLES,
                 seed: int = 0) -> pd.DataFrame:
    """``budgets.csv``: one row per configuration and budget with :data:`BUDGET_COLUMNS` (see the module
    docstring; accuracies and differences in %). ``delta`` is taken against the reference configuration
    with the same other settings (the ablation table's Δ). Without test logits in every run folder the
    intervals, differences and verdicts are left blank (logged)."""
    budgets = [float(b) for b in budgets]
    per_run = run_metrics(results, budgets)
    point = {config: [float(per_run.loc[per_run["config"] == config, f"acc_at_{b:g}"].mean(skipna=False))
                      for b in budgets] for config in results.configs}
    samples = _bootstrap(results, budgets, resamples, seed) if budgets else None
    rows = []
    for c, config in enumerate(results.configs):
        reference = reference_config(results, config)
        for b, budget in enumerate(budgets):
            row = {"configuration": config, "budget_gmacs": budget, "accuracy": point[config][b],
                   "ci_low": np.nan, "ci_high": np.nan, "delta": np.nan, "delta_ci_low": np.nan,
                   "delta_ci_high": np.nan, "verdict": ""}
            if reference is not None:
                row["delta"] = point[config][b] - point[reference][b]
            if samples is not None:
                low, high = interval(samples[:, c, b])
                row["ci_low"], row["ci_high"] = float(low), float(high)
                if reference is not None:
                    diff = samples[:, c, b] - samples[:, results.configs.index(reference), b]
                    low, high = interval(diff)
                    row["delta_ci_low"], row["delta_ci_high"] = float(low), float(high)
                    row["verdict"] = verdicts(low, high).item()
            rows.append(row)
    table = pd.DataFrame(rows, columns=BUDGET_COLUMNS)
    numbers = BUDGET_COLUMNS[2:-1]
    table[numbers] = table[numbers].round(6)  # the bootstrap sums in float32: no spurious digits
    table.attrs.update(budgets=budgets, resamples=resamples, reference=results.reference,
                       bootstrapped=samples is not None)
    return table


def _bootstrap(results: Results, budgets: list[float], resamples: int, seed: int) -> np.ndarray | None:
    outcomes, test_sets, fingerprints = [], [], {}
    for config in results.configs:
        per_seed, sets = [], []
        for rid in results.runs.loc[results.runs["config"] == config, "run_id"]:
            got = run_outcomes(results, rid, budgets)
            if got is None:
                log.warning("run %s has no test logits: budgets.csv gets no intervals or verdicts", rid)
                return None
            values, targets = got
            # the same test set: the same targets in the same order
            sets.append(fingerprints.setdefault(targets.tobytes(), len(fingerprints)))
            per_seed.append(values)
        outcomes.append(per_seed)
        test_sets.append(sets)
    return bootstrap_accuracy(outcomes, test_sets, resamples, seed)


# ------------------------------------------------------------------------------------------- tables

def _cell(row: pd.Series, digits: int) -> str:
    if not np.isfinite(row["accuracy"]):
        return ""
    text = f"{row['accuracy']:.{digits}f}"
    if np.isfinite(row["ci_low"]):
        text += f" ({row['ci_low']:.{digits}f}–{row['ci_high']:.{digits}f})"
    if np.isfinite(row["delta"]) and row["verdict"]:
        text += f"; Δ {row['delta']:+.{digits}f} {MARKS[row['verdict']]}"
    return text


def format_budgets(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """budgets.csv as display strings: one row per configuration, one column per budget; each cell
    ``accuracy (interval); Δ difference mark`` with ▲ better, ▼ worse, = level (LaTeX: arrows)."""
    configs = list(dict.fromkeys(table["configuration"]))
    budgets = list(dict.fromkeys(table["budget_gmacs"]))
    out = pd.DataFrame({"Configuration": configs})
    for budget in budgets:
        rows = table[table["budget_gmacs"] == budget].set_index("configuration")
        out[f"@ {budget:g} GMACs"] = [_cell(rows.loc[c], digits) for c in configs]
    return out


def budgets_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    return markdown_table(format_budgets(table, digits), budget_notes(table))


def budgets_latex(table: pd.DataFrame, digits: int = 2) -> str:
    return latex_table(format_budgets(table, digits), budget_notes(table))


def budget_notes(table: pd.DataFrame) -> list[str]:
    reference = table.attrs.get("reference", "")
    notes = [table.attrs["evaluation"]] if table.attrs.get("evaluation") else []
    notes += ["Accuracy (%) at each budget along the budgeted curve (interpolated, never extrapolated; blank outside "
             "it), mean over seeds."]
    if table.attrs.get("bootstrapped"):
        notes.append(f"In brackets: 95 % interval of a bootstrap over test images and seeds "
                     f"({table.attrs.get('resamples')} resamples; the same images for every configuration, so "
                     "differences are paired).")
        notes.append(f"Δ: difference to {reference!r} with the same other settings; ▲ better, ▼ worse, = level "
                     "(the difference's 95 % interval contains 0).")
    else:
        notes.append("No intervals or verdicts: some run folders have no test logits to resample.")
    return notes
