"""dynexit migrate-ids: rename run folders named by the old run id to their current id."""
from __future__ import annotations

from dynexit.cli.options import HelpFormatter, add_out

EPILOG = """examples:
  dynexit migrate-ids experiments/fashion_mnist.yaml --dry-run
  dynexit migrate-ids experiments/fashion_mnist.yaml
  dynexit migrate-ids my_spec.yaml --out results/old_copy --threads 2

Run ids once hashed the whole configuration (eval section included) and CPU runs took a share of the
machine's threads. Now a run's id covers what determines its weights (model, data, train including
train.threads, seed). This renames each run folder to its current id, taking the threads the run used
from its status.json (or --threads when the folder does not record them), writes its eval.json, and
rewrites index.csv, runs.csv, curves.csv and the run ids in the results folder's other CSV files."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "migrate-ids", help="rename run folders named by the old run id (before train.threads) to their current id",
        description="Give the run folders of an experiment's results their current run ids, and rewrite the "
                    "experiment's CSV files to match.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("spec", help="the experiment spec (its results_dir is migrated)")
    add_out(p, "DIR", "the results folder to migrate (default: the spec's results_dir)", old=("--results-dir",))
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads the runs used, for run folders whose status.json does not record them")
    p.add_argument("--dry-run", action="store_true", help="print the renames; change nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.runs.migration import migrate_run_ids, plan_migration

    if args.dry_run:
        plan = plan_migration(args.spec, args.out, args.threads)
    else:
        plan = migrate_run_ids(args.spec, args.out, args.threads)
    for r in plan:
        note = "" if r.in_spec else "  (not a run of the spec)"
        print(f"{r.old_id} -> {r.new_id}  train.threads={r.threads}{note}")
    print(f"{len(plan)} run folder(s) {'to rename' if args.dry_run else 'renamed'}")
    return 0
