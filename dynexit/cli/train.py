"""dynexit train: train one run configuration into a run folder, resumably."""
from __future__ import annotations

import os
from pathlib import Path

from dynexit.cli.options import MODEL_RULE, SET_RULE, HelpFormatter, add_device, add_out, add_set

EPILOG = """examples:
  dynexit train experiments/train_digits.yaml
  dynexit train experiments/train_digits.yaml --set train.epochs=3 --set seed=1 --out runs/digits_s1

On several GPUs (or CPU processes), start the same command through torchrun:
'torchrun --standalone --nproc_per_node=2 -m dynexit train experiments/train_digits.yaml --out runs/ddp'.
The run folder gets config.yaml, checkpoint.pt (every epoch), metrics.csv, tb/ (TensorBoard) and
train_result.json. Running the same command again resumes from the last checkpoint; a folder holding a
checkpoint of another configuration is refused. Under torchrun, train.batch_size is per process.

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train one run configuration (resumes from the run folder's checkpoint)",
        description="Train the model of a run configuration (a RunConfig YAML: model, data, train, eval, "
                    "seed) and write checkpoints and per-epoch metrics into a run folder; "
                    f"{MODEL_RULE}.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("config", help="run configuration (YAML)")
    add_set(p)
    add_out(p, "DIR", "run folder (default: runs/<config file name without .yaml>)", kind=Path)
    add_device(p)
    p.add_argument("--no-resume", action="store_true",
                   help="refuse to continue an existing checkpoint instead of resuming it")
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.config import load_run_config
    from dynexit.runs.folders import lock_held_by_parent, run_lock
    from dynexit.training import train

    cfg = load_run_config(args.config, args.set)
    out = Path(args.out if args.out is not None else Path("runs") / Path(args.config).stem)
    if lock_held_by_parent(out) or int(os.environ.get("RANK", "0")) != 0:  # rank 0 locks for all ranks
        result = train(cfg, out, device=args.device, resume=not args.no_resume)
    else:
        with run_lock(out) as acquired:
            if not acquired:
                raise RuntimeError(f"{out} is locked by another process that trains or evaluates this run; "
                                   f"wait for it to end, or train into another --out folder")
            result = train(cfg, out, device=args.device, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print_result(result)
    return 0


def print_result(result) -> None:
    """The final per-exit accuracies as a small table."""
    metrics = result.metrics
    exits = [k[len("test_acc_"):] for k in metrics if k.startswith("test_acc_")]
    print(f"run folder: {result.run_dir}  ({result.epochs} epochs, {result.steps} steps, "
          f"{result.wall_time:.1f} s)")
    if not exits:
        return
    rows = [("split", *exits)]
    for split in ("train", "calib", "test", "ema_calib", "ema_test"):
        if f"{split}_acc_{exits[0]}" in metrics:
            rows.append((f"{split} acc %", *(f"{metrics[f'{split}_acc_{e}']:.2f}" for e in exits)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
