"""dynexit compare: does an experiment's results reproduce a reference run of the same spec?"""
from __future__ import annotations

from dynexit.cli.options import HelpFormatter

EPILOG = """examples:
  dynexit compare runs/quickstart results/quickstart
  dynexit compare runs/quickstart results/quickstart --budgets 0.012,0.013 --sigmas 3

Configurations are matched by run id. Each is "bit-identical" (calibration and test logits equal to the
reference's), "within spread" (final accuracy and accuracy at each budget within the reference's mean
+- SIGMAS standard deviations over its seeds, per variant), "differs" or "missing". The verdict is
"reproduced" when every configuration is bit-identical or within the spread; the exit status is 0 then,
1 otherwise."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="check whether an experiment's results reproduce a reference (e.g. the committed quickstart)",
        description="Compare the runs of an experiment's results folder with those of a reference results "
                    "folder of the same spec, configuration by configuration, and print a verdict.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="the results to check")
    p.add_argument("reference_dir", metavar="REFERENCE_DIR", help="the reference results (e.g. results/quickstart)")
    p.add_argument("--budgets", metavar="B,B,...",
                   help="GMACs budgets at which accuracy is compared (default: the reference's acc_at_* columns)")
    p.add_argument("--sigmas", type=float, default=2.0,
                   help="width of the seed spread, in standard deviations over the reference's seeds (default: 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.analysis.compare import compare_results, format_comparison
    from dynexit.cli.report import float_list

    budgets = float_list(args.budgets, "--budgets") if args.budgets else None
    comparison = compare_results(args.results_dir, args.reference_dir, budgets=budgets, sigmas=args.sigmas)
    print(format_comparison(comparison))
    return 0 if comparison.reproduced else 1
