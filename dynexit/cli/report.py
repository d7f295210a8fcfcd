"""dynexit report: figures and tables of an experiment's results."""
from __future__ import annotations

from pathlib import Path

from dynexit.cli.options import HelpFormatter, add_out

EPILOG = """examples:
  dynexit report results/quickstart
  dynexit report results/quickstart --out paper/figures --formats pdf --budgets 0.012,0.013,0.015

Writes into RESULTS_DIR/report/ (or --out): budgeted_curves, exit_shares, exit_accuracy, confidence and
training_curves figures (PNG and PDF), the loss-weight search's figures when RESULTS_DIR/search/loss_weights
holds a trials.csv, the ablation table (ablation.csv, ablation.md, ablation.tex), budgets.csv (.md, .tex):
each configuration's accuracy at each budget with a 95 % bootstrap interval over test images and seeds, its
difference to the reference configuration with an interval and a verdict (better, worse, level), with
RESULTS_DIR/latency.csv ('dynexit bench RESULTS_DIR') the expected latency of every operating point
(latency.csv) and accuracy against GMACs and latency (latency figure), the data behind each figure as CSV,
and report.html: one self-contained page with the spec, the tables, every figure, the runs and the package
versions. Accuracy at a budget is interpolated along each curve and left blank outside it."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="budgeted accuracy curves, ablation table and exit-behaviour figures of an experiment",
        description="Read an experiment's results folder (runs.csv, curves.csv, run folders) and write its "
                    "figures and tables: budgeted accuracy curves (mean and std over seeds), the ablation "
                    "table, and where samples leave and how confident each exit is.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="an experiment's results folder")
    add_out(p, "DIR", "output folder (default: RESULTS_DIR/report)")
    p.add_argument("--formats", default="png,pdf", metavar="F,F",
                   help="figure formats, comma-separated: png, pdf, svg (default: png,pdf)")
    p.add_argument("--budgets", metavar="B,B,...",
                   help="GMACs budgets of the tables' accuracy columns and of budgets.csv (default: five "
                        "spread over the cost range that every multi-exit curve covers)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="pool the runs of a configuration even when they were evaluated differently (criterion, "
                        "grid, EMA, batch size); the report says which. Without it, such a folder is refused")
    p.add_argument("--no-published", action="store_true",
                   help="leave the published numbers of the released ImageNet models out of the figure")
    p.set_defaults(func=run)


def float_list(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r} is not a comma-separated list of numbers") from None


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    if not getattr(args, "verbose", False):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line for a search's figures
    from dynexit.analysis import write_report

    results_dir = Path(args.results_dir)
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    budgets = float_list(args.budgets, "--budgets") if args.budgets else None
    written = write_report(results_dir, args.out, formats=formats, budgets=budgets,
                           published=False if args.no_published else "auto", allow_mixed=args.allow_mixed)
    markdown = next(p for p in written["ablation table"] if p.suffix == ".md")
    print(markdown.read_text())
    width = max(len(item) for item in written)
    for item, paths in written.items():
        print(f"{item:<{width}}  {', '.join(str(p) for p in paths)}")
    return 0
