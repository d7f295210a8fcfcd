"""Whether an experiment's results reproduce a reference run of the same spec (``dynexit compare``).

Configurations (variant x grid x seed) are matched by run id: the same id means the same model, data,
training, threads and seed. A configuration is reproduced when

* its calibration and test logits are bit-identical to the reference's (the same code on the same kind of
  machine computes the same bits), or else
* its final accuracy and its accuracy at each budget lie within the reference's seed spread for its
  variant: the mean over the reference's seeds +- ``sigmas`` standard deviations.

The experiment is reproduced when every configuration of the reference is. A configuration evaluated on
other test images (a fallback data set) differs, whatever its accuracy.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dynexit.curves import accuracy_at_budget
from dynexit.logits import load_logits

BIT_IDENTICAL, WITHIN_SPREAD, DIFFERS, MISSING = "bit-identical", "within spread", "differs", "missing"
OTHER_IMAGES = "evaluated on other images"


@dataclass
class ConfigurationCheck:
    """The verdict on one configuration of the reference."""

    run_id: str
    variant: str
    seed: int
    verdict: str  # bit-identical | within spread | differs | missing
    details: list[str] = field(default_factory=list)  # what differs, or the metrics and their spread


@dataclass
class Comparison:
    results_dir: Path
    reference_dir: Path
    budgets: list[float]
    sigmas: float
    checks: list[ConfigurationCheck]

    @property
    def reproduced(self) -> bool:
        return all(c.verdict in (BIT_IDENTICAL, WITHIN_SPREAD) for c in self.checks)

    def verdict(self) -> str:
        """One line: "reproduced: ..." or "not reproduced: ..."."""
        n = len(self.checks)
        counts = {v: sum(c.verdict == v for c in self.checks) for v in (BIT_IDENTICAL, WITHIN_SPREAD, DIFFERS,
                                                                         MISSING)}
        if self.reproduced:
            if counts[BIT_IDENTICAL] == n:
                return f"reproduced: all {n} configurations bit-identical to the reference"
            return (f"reproduced: {counts[BIT_IDENTICAL]} of {n} configurations bit-identical to the reference, "
                    f"{counts[WITHIN_SPREAD]} within its seed spread (mean +- {self.sigmas:g} std)")
        parts = [f"{counts[DIFFERS]} differ" if counts[DIFFERS] else "",
                 f"{counts[MISSING]} missing" if counts[MISSING] else ""]
        return f"not reproduced: of {n} configurations, {', '.join(p for p in parts if p)} (listed above)"


def compare_results(results_dir: str | Path, reference_dir: str | Path, budgets: list[float] | None = None,
                    sigmas: float = 2.0) -> Comparison:
    """Compares every configuration of the reference experiment's results with the same run in
    ``results_dir``. ``budgets`` (GMACs; default: the reference's ``acc_at_<budget>`` columns) are the
    budgets at which accuracy along the budgeted curve is compared."""
    if not (isinstance(sigmas, (int, float)) and math.isfinite(sigmas) and sigmas >= 0):
        raise ValueError(f"sigmas must be a finite number >= 0, got {sigmas!r}")
    results_dir, reference_dir = Path(results_dir), Path(reference_dir)
    ref_runs, ref_curves = _read(reference_dir)
    new_runs, new_curves = _read(results_dir)
    if budgets is None:
        budgets = sorted(float(c[len("acc_at_"):]) for c in ref_runs.columns if re.fullmatch(r"acc_at_[0-9.e+-]+", c))
    ref_metrics = _metrics(ref_runs, ref_curves, budgets)
    new_metrics = _metrics(new_runs, new_curves, budgets)
    spread = {variant: (group.mean(), group.std(ddof=1).fillna(0.0) if len(group) > 1 else group.mean() * 0)
              for variant, group in ref_metrics.groupby(ref_runs.set_index("run_id")["variant"])}
    checks = []
    for ref in ref_runs.itertuples():
        rid, variant, seed = str(ref.run_id), str(ref.variant), int(ref.seed)
        if rid not in new_metrics.index:
            checks.append(ConfigurationCheck(rid, variant, seed, MISSING, [f"no finished run {rid} in {results_dir}"]))
            continue
        same, why = _same_logits(results_dir / "runs" / rid, reference_dir / "runs" / rid)
        if same:
            checks.append(ConfigurationCheck(rid, variant, seed, BIT_IDENTICAL))
            continue
        if why.startswith(OTHER_IMAGES):
            checks.append(ConfigurationCheck(rid, variant, seed, DIFFERS, [why]))
            continue
        mean, std = spread[variant]
        outside, inside = [], []
        for metric in ref_metrics.columns:
            value, m, s = new_metrics.at[rid, metric], mean[metric], std[metric]
            if math.isnan(m) and math.isnan(value):
                continue  # a budget outside both curves
            text = f"{metric} {value:.2f} (reference {m:.2f} +- {sigmas * s:.2f})"
            (inside if abs(value - m) <= sigmas * s + 1e-9 else outside).append(text)
        if outside:
            checks.append(ConfigurationCheck(rid, variant, seed, DIFFERS, [why] + outside))
        else:
            checks.append(ConfigurationCheck(rid, variant, seed, WITHIN_SPREAD, [why] + inside))
    return Comparison(results_dir, reference_dir, list(budgets), float(sigmas), checks)


def format_comparison(comparison: Comparison) -> str:
    """A table of the configurations and their verdicts, then the verdict line."""
    lines = [f"{comparison.results_dir} against the reference {comparison.reference_dir} "
             f"(budgets {', '.join(f'{b:g}' for b in comparison.budgets) or 'none'} GMACs):"]
    for c in comparison.checks:
        lines.append(f"  {c.run_id:<11} {c.variant:<14} seed {c.seed:<3} {c.verdict}")
        if c.verdict != BIT_IDENTICAL:
            lines.extend(f"      {d}" for d in c.details)
    lines.append(comparison.verdict())
    return "\n".join(lines)


def _read(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    for name in ("runs.csv", "curves.csv"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: is {folder} an experiment's results folder?")
    runs = pd.read_csv(folder / "runs.csv")
    missing = [c for c in ("run_id", "variant", "seed", "acc_final") if c not in runs.columns]
    if missing:
        raise ValueError(f"{folder / 'runs.csv'} has no column {missing[0]!r}")
    runs["run_id"] = runs["run_id"].astype(str)
    curves = pd.read_csv(folder / "curves.csv")
    curves["run_id"] = curves["run_id"].astype(str)
    return runs, curves


def _metrics(runs: pd.DataFrame, curves: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    """Per run id: final accuracy and accuracy at each budget along its curve (NaN outside it)."""
    rows = {}
    for rid, final in zip(runs["run_id"], runs["acc_final"]):
        row = {"acc_final": float(final)}
        curve = curves[curves["run_id"] == rid]
        for budget in budgets:
            row[f"acc_at_{budget:g}"] = (accuracy_at_budget(curve["test_expected_cost"], curve["test_accuracy"], budget)
                                         if len(curve) else float("nan"))
        rows[rid] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _same_logits(run: Path, reference: Path) -> tuple[bool, str]:
    """Whether both runs' calibration and test logits are bit-identical; if not, why."""
    for split in ("test", "calib"):
        a_path, b_path = run / f"logits_{split}.npz", reference / f"logits_{split}.npz"
        if not a_path.is_file() or not b_path.is_file():
            return False, f"no {split} logits to compare ({a_path if not a_path.is_file() else b_path} missing)"
        (a, a_targets), (b, b_targets) = load_logits(a_path), load_logits(b_path)
        if a_targets.shape != b_targets.shape or not np.array_equal(a_targets, b_targets):
            return False, (f"{OTHER_IMAGES}: the {split} targets differ ({len(a_targets)} vs {len(b_targets)} "
                           f"images; another data set, such as data.fallback?)")
        if a.shape != b.shape:
            return False, f"{split} logits have shape {a.shape}, the reference {b.shape}"
        if not np.array_equal(a, b):
            return False, f"{split} logits not bit-identical (largest difference {np.abs(a - b).max():.3g})"
    return True, ""
