"""Speed of the threshold search on ImageNet-sized logits.

Random logits (seeded; as in bench_protocol.py): 4 exits, 12,928 calibration and 50,000 test samples,
1000 classes. Prints the time of one trial's evaluation (``evaluate_thresholds`` on the calibration
split), then trials per minute of a budget study (TPE with the cost constraint) and of the Pareto study
(NSGA-II), each in memory and on an SQLite file (the default storage of ``dynexit search thresholds``),
measured over ``--trials`` trials of a fresh study in this process: per minute of wall-clock time, and
per minute of this process's CPU time (less sensitive to other work on a shared machine). The load
average is printed with the figures.

    python benchmarks/bench_search.py [--trials 1000] [--skip-memory]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).parent))
from bench_protocol import CALIB, COSTS, TEST, make_logits  # noqa: E402

from dynexit.policies import evaluate_thresholds  # noqa: E402
from dynexit.search import open_storage, search_budgets, search_pareto, sqlite_url, threshold_problem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000, help="trials per measured study (default 1000)")
    parser.add_argument("--skip-memory", action="store_true", help="only the SQLite storage")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(0)
    calib_logits, calib_targets = make_logits(rng, CALIB)
    test_logits, test_targets = make_logits(rng, TEST)
    start = time.perf_counter()
    problem = threshold_problem(calib_logits, calib_targets, test_logits, test_targets, COSTS)
    print(f"logits: calibration {calib_logits.shape}, test {test_logits.shape}; scoring both splits "
          f"{time.perf_counter() - start:.2f} s")

    shares = rng.uniform(size=(200, 3))
    times = []
    for s in shares:
        t0 = time.perf_counter()
        evaluate_thresholds(problem.calib_conf, problem.calib_correct, problem.thresholds(s), problem.costs)
        times.append(time.perf_counter() - t0)
    print(f"one trial's evaluation (thresholds from shares + evaluate_thresholds): "
          f"{statistics.median(times) * 1e3:.3f} ms median")

    budget = 0.9
    with tempfile.TemporaryDirectory() as tmp:
        storages = [("sqlite", sqlite_url(Path(tmp) / "bench.db"))]
        if not args.skip_memory:
            storages.insert(0, ("memory", None))
        print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        print(f"{'study':<8} {'storage':<8} {'trials':>7} {'seconds':>8} {'trials/min':>11} {'trials/CPU-min':>15}")
        for label, url in storages:
            for kind in ("budget", "pareto"):
                storage = open_storage(url)
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "budget":
                    search_budgets(problem, [budget], args.trials, storage=storage, study_prefix=f"bench{label}")
                else:
                    search_pareto(problem, args.trials, storage=storage, study_prefix=f"bench{label}")
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                print(f"{kind:<8} {label:<8} {args.trials:>7} {seconds:>8.1f} {args.trials / seconds * 60:>11.0f} "
                      f"{args.trials / cpu * 60:>15.0f}")
    print(f"\nload average {os.getloadavg()[0]:.2f}; each figure includes building the trials table and the "
          "curve at the end of the study")


if __name__ == "__main__":
    main()
