"""dynexit curve: budgeted accuracy/cost curve from saved per-exit logits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dynexit.cli import HelpFormatter
from dynexit.logits import load_logits
from dynexit.policies import CRITERIA, anytime_accuracy, budgeted_curve, check_costs
from dynexit.utils import atomic_write_text, read_csv_file

EPILOG = """examples:
  dynexit curve --calib logits_calib.npz --test logits_test.npz --costs costs.csv --out curve.csv
  dynexit curve --calib c.npz --test t.npz --costs 0.46,1.06,1.23,1.30 --grid msdnet --criterion margin \\
      --temperature --out curve.csv

COSTS is a comma-separated list of per-exit costs (cost of a sample stopping at each exit, in exit
order) or a CSV written by 'dynexit costs' (its 'gmacs' column, rows in exit order; its 'exit' column,
when present, names the exits). The CSV has one row per operating point: target shares, thresholds
(threshold_<exit>), accuracy (percent) and expected cost on both splits, and per-exit shares."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "curve", help="budgeted accuracy/cost curve from saved logits",
        description="Set exit thresholds on the calibration logits with the budgeted protocol (official "
                    "Dynamic Perceiver grid or MSDNet's geometric grid), apply them to the test logits and "
                    "write one CSV row per operating point.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--calib", required=True, metavar="CALIB.npz", help="calibration logits (dynexit .npz)")
    p.add_argument("--test", required=True, metavar="TEST.npz", help="test logits (dynexit .npz)")
    p.add_argument("--costs", required=True, metavar="COSTS", help="per-exit costs: a,b,c,... or costs.csv")
    p.add_argument("--grid", choices=("official", "msdnet"), default="official",
                   help="target exit shares (default: official)")
    p.add_argument("--criterion", choices=CRITERIA, default="max_softmax", help="confidence (default: max_softmax)")
    p.add_argument("--temperature", action="store_true",
                   help="scale each exit's logits by a temperature fitted on the calibration split")
    p.add_argument("--exit-names", metavar="A,B,...", help="exit names for the column names "
                   "(default: the costs CSV's 'exit' column, else 0, 1, ...)")
    p.add_argument("--out", required=True, metavar="CURVE.csv", help="CSV file to write")
    p.set_defaults(func=run)


def read_costs(spec: str) -> tuple[np.ndarray, list[str] | None]:
    """Per-exit costs and (from a CSV's ``exit`` column) exit names, from ``--costs``; the costs must
    increase strictly from exit to exit."""
    path = Path(spec)
    if path.suffix.lower() == ".csv" or path.exists():
        table = read_csv_file(path, "costs file")
        if "gmacs" not in table.columns:
            raise ValueError(f"{path} has no 'gmacs' column (columns: {', '.join(map(str, table.columns))})")
        costs = pd.to_numeric(table["gmacs"], errors="coerce").to_numpy(dtype=float)
        if np.isnan(costs).any():
            raise ValueError(f"{path}: the 'gmacs' column holds empty or non-numeric values")
        names = [str(n) for n in table["exit"]] if "exit" in table.columns else None
        return check_costs(costs, names, where=f"costs file {path}"), names
    try:
        costs = np.array([float(v) for v in spec.split(",")])
    except ValueError:
        raise ValueError(f"--costs {spec!r} is neither a CSV file nor a comma-separated list of numbers") from None
    return check_costs(costs, where=f"--costs {spec}"), None


def read_inputs(args):
    """The logits, costs and exit names of ``--calib``, ``--test``, ``--costs`` and ``--exit-names``, checked
    against each other: ``(calib_logits, calib_targets, test_logits, test_targets, costs, names)``."""
    costs, names = read_costs(args.costs)
    if args.exit_names:
        names = [n.strip() for n in args.exit_names.split(",")]
    calib_logits, calib_targets = load_logits(args.calib)
    test_logits, test_targets = load_logits(args.test)
    num_exits = calib_logits.shape[0]
    if len(costs) != num_exits:
        raise ValueError(f"--costs has {len(costs)} values but {args.calib} has {num_exits} exits")
    if names is not None and len(names) != num_exits:
        raise ValueError(f"{len(names)} exit names ({', '.join(names)}) for {num_exits} exits")
    return calib_logits, calib_targets, test_logits, test_targets, costs, names


def run(args) -> int:
    calib_logits, calib_targets, test_logits, test_targets, costs, names = read_inputs(args)
    num_exits = calib_logits.shape[0]
    curve = budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, costs, grid=args.grid,
                           criterion=args.criterion, temperatures="fit" if args.temperature else None,
                           exit_names=names)
    atomic_write_text(args.out, curve.to_csv(index=False))

    labels = names or [str(k) for k in range(num_exits)]
    print(f"{args.grid} grid, {len(curve)} points, criterion {args.criterion}; calibration "
          f"{calib_logits.shape[1]} samples, test {test_logits.shape[1]} samples, {num_exits} exits")
    temps = curve.attrs.get("temperatures")
    if temps:
        print("temperatures: " + ", ".join(f"{n}={t:.3f}" for n, t in zip(labels, temps)))
    anytime = anytime_accuracy(test_logits, test_targets, costs, exit_names=labels)
    print("\nexits alone (test):")
    print(f"  {'exit':<12} {'cost':>10} {'acc %':>7}")
    for row in anytime.itertuples():
        print(f"  {row.exit:<12} {row.cost:>10.4g} {row.accuracy:>7.2f}")
    print("\nbudgeted curve:")
    print(f"  {'point':>5} {'test cost':>10} {'test acc %':>10} {'calib cost':>10} {'calib acc %':>11}")
    for row in curve.itertuples():
        print(f"  {row.point:>5} {row.test_expected_cost:>10.4g} {row.test_accuracy:>10.2f} "
              f"{row.calib_expected_cost:>10.4g} {row.calib_accuracy:>11.2f}")
    print(f"\nwrote {args.out}")
    return 0
