"""dynexit status: finished, running, failed and pending runs of an experiment."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from dynexit.cli.options import SET_RULE, HelpFormatter, add_set

EPILOG = """examples:
  dynexit status experiments/quickstart.yaml
  dynexit status results/quickstart
  dynexit status experiments/quickstart.yaml --set train.epochs=30

--set KEY=VALUE takes what 'dynexit run' takes, so that status shows the runs that 'dynexit run SPEC --set
...' makes (a run's id covers its settings).

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "status", help="show the state of every run of an experiment",
        description="Show which runs of an experiment are done, stale (done, but evaluated with other eval "
                    "settings: the next run evaluates them again), running, failed, interrupted or pending; "
                    "for each running run, its epoch k/N, its last evaluated accuracy (last exit) and an "
                    "estimate of the time left, read from its folder's files. "
                    "Takes the spec, or the results folder (which keeps a copy of the spec).",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("target", help="SPEC.yaml or RESULTS_DIR")
    add_set(p)
    p.set_defaults(func=run)


def print_status(experiment) -> None:
    from dynexit.runs.folders import experiment_status

    rows = experiment_status(experiment)
    others = sum(not row["in_spec"] for row in rows)
    print(f"{experiment.name}: {len(rows) - others} runs in {experiment.results_dir}"
          + (f", and {others} other run folders there (marked *: not runs of this spec)" if others else ""))
    jobs = _job_column(experiment, rows)
    job_header = f"{'job (scheduler state)':<26} " if jobs else ""
    print(f"{'run':<11} {'state':<12} {'variant':<14} {job_header}overrides / error")
    for row in rows:
        detail = row["error"] or ", ".join(f"{k}={v}" for k, v in row["overrides"].items())
        if row["eval_changes"]:
            detail += f"  [to evaluate again: {'; '.join(row['eval_changes'])}]"
        job = f"{jobs.get(row['run_id'], '-'):<26} " if jobs else ""
        variant = row["variant"] if row["in_spec"] else f"*{row['variant']}"
        print(f"{row['run_id']:<11} {row['state']:<12} {variant:<14} {job}{detail}")
    _print_running(experiment, rows)
    counts = Counter(row["state"] for row in rows)
    print("  ".join(f"{state}: {n}" for state, n in sorted(counts.items())))


def _print_running(experiment, rows) -> None:
    """Each running run's epoch k/N, last evaluated accuracy (last exit) and time left, from its folder's files."""
    from dynexit.runs.folders import RUNNING
    from dynexit.runs.run_progress import run_progress
    from dynexit.runs.runner import clock

    running = [row for row in rows if row["state"] == RUNNING]
    if not running:
        return
    print(f"{'running run':<11} {'epoch':<9} {'last accuracy':<26} time left")
    for row in running:
        progress = run_progress(experiment.results_dir / "runs" / row["run_id"])
        epoch = f"{progress['epoch']}/{progress['epochs']}" if progress["epochs"] is not None else "starting"
        accuracy = (f"{progress['accuracy']:.2f}% ({progress['accuracy_column']})"
                    if progress["accuracy"] is not None else "-")
        left = f"about {clock(progress['seconds_left'])}" if progress["seconds_left"] is not None else "-"
        print(f"{row['run_id']:<11} {epoch:<9} {accuracy:<26} {left}")


def _job_column(experiment, rows) -> dict[str, str]:
    """``{run_id: "JOBID (STATE)"}`` for runs submitted to SLURM, the state as ``sacct`` reports it now."""
    from dynexit.runs.slurm import scheduler_states

    ids = {row["run_id"]: row["job_id"] for row in rows if row.get("job_id")}
    if not ids:
        return {}
    if experiment.executor.kind != "slurm":
        return {run_id: job for run_id, job in ids.items()}
    try:
        states = scheduler_states(list(ids.values()))
    except FileNotFoundError as err:
        print(f"({err})")
        return {run_id: f"{job} (?)" for run_id, job in ids.items()}
    return {run_id: f"{job} ({states.get(job, 'UNKNOWN')})" for run_id, job in ids.items()}


def run(args) -> int:
    from dynexit.runs.spec import load_spec

    target = Path(args.target)
    if target.is_dir():
        spec_copy = target / "experiment.yaml"
        if not spec_copy.is_file():
            raise FileNotFoundError(f"{target} holds no experiment.yaml; is it an experiment's results folder?")
        experiment = load_spec(spec_copy, args.set, import_factories=False)  # a results folder is data
        experiment.results_dir = target
    else:
        experiment = load_spec(target, args.set)
    print_status(experiment)
    return 0
