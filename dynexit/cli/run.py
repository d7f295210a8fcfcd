"""dynexit run: run an experiment spec's grid, resumably."""
from __future__ import annotations

from dynexit.cli.options import MODEL_RULE, SET_RULE, HelpFormatter, add_hidden_alias, add_out, add_set

EPILOG = """examples:
  dynexit run experiments/quickstart.yaml
  dynexit run experiments/quickstart.yaml --dry-run
  dynexit run experiments/imagenet_ablations.yaml --devices cuda:0,cuda:1 --set train.epochs=50
  dynexit run experiments/quickstart.yaml --devices cpu --workers 2
  dynexit run experiments/quickstart.yaml --out runs/quickstart

Running the same command again skips finished runs and resumes interrupted ones from their last
checkpoint. A run's id covers what determines its weights (model, data, train, seed), not its eval
section: when only eval settings change, finished runs are evaluated again without training. Each run
computes with its own train.threads CPU threads, so --workers changes the speed, not the numbers.
With executor.kind slurm the runs are submitted as one job array and the command returns (--wait blocks);
running it again submits only runs whose jobs are no longer queued or running. Here --set also takes the
spec's executor keys (--set executor.kind=slurm --set executor.gpus_per_run=2 --set executor.cpus_per_gpu=8);
they do not change run ids. A submitted job runs the spec as it was when submitted, also when requeued.
Results: <results_dir>/runs.csv and curves.csv, one folder per run under runs/.

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run an experiment spec (a grid of configurations), resumably",
        description="Expand a YAML spec into runs, validate every run, then train and evaluate each run "
                    "that is not finished, on the devices there are; "
                    f"{MODEL_RULE}.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("spec", help="experiment spec (YAML)")
    add_set(p)
    p.add_argument("--devices", default="auto", help="auto | cpu | cuda:0,cuda:1,... (default: auto)")
    add_hidden_alias(p, "--device", "devices")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel workers (default: one per GPU, or 1 on the CPU)")
    add_out(p, "DIR", "the results folder: write the results here instead of the spec's results_dir",
            old=("--results-dir",))
    p.add_argument("--wait", action="store_true",
                   help="SLURM: wait for the submitted jobs to finish (default: return once they are submitted)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what is done; run nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.cli.status import print_status
    from dynexit.runs.folders import FAILED
    from dynexit.runs.runner import check_experiment, run_experiment
    from dynexit.runs.spec import load_spec

    experiment = load_spec(args.spec, args.set, args.out)
    if args.dry_run:
        check_experiment(experiment)  # every check the run makes before it writes
        print_status(experiment)
        return 0
    outcomes = run_experiment(experiment, devices=args.devices, workers=args.workers, overrides=args.set,
                              wait=True if args.wait else None)
    print_status(experiment)
    failed = [o for o in outcomes if o.state == FAILED]
    return 1 if failed else 0
