"""dynexit curve: budgeted accuracy/cost curve from saved per-exit logits."""
from __future__ import annotations

from dynexit.cli.options import (
    HelpFormatter,
    add_criterion,
    add_grid,
    add_logits_inputs,
    add_out,
    add_temperature,
    read_inputs,
)

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
        description="Set exit thresholds on the calibration logits with the budgeted protocol (the full grid, "
                    "from every sample at the first exit to every sample at the last; the official Dynamic "
                    "Perceiver grid or MSDNet's geometric grid), apply them to the test logits and "
                    "write one CSV row per operating point.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    add_logits_inputs(p)
    add_grid(p)
    add_criterion(p)
    add_temperature(p)
    add_out(p, "CURVE.csv", "CSV file to write", required=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.policies import anytime_accuracy, budgeted_curve
    from dynexit.utils import atomic_write_text

    calib_logits, calib_targets, test_logits, test_targets, costs, names = read_inputs(args)
    num_exits = calib_logits.shape[0]
    curve = budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, costs, grid=args.grid,
                           criterion=args.criterion, temperatures="fit" if args.temperature else None,
                           exit_names=names)
    atomic_write_text(args.out, curve.to_csv(index=False))

    labels = names or [str(k) for k in range(num_exits)]
    temps = curve.attrs.get("temperatures")
    temperature = ("temperatures fitted on the calibration split: " + ", ".join(
        f"{n}={t:.3f}" for n, t in zip(labels, temps))) if temps else "no temperature"
    print(f"{args.grid} grid, {len(curve)} points, criterion {args.criterion}, {temperature}; calibration "
          f"{calib_logits.shape[1]} samples, test {test_logits.shape[1]} samples, {num_exits} exits")
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
