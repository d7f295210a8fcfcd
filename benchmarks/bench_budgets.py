"""Speed of the paired bootstrap behind report/budgets.csv.

Random per-image outcomes (seeded) of 10 configurations x 10 budgets x 10,000 test images, one test set for
all (paired), 1 seed per configuration unless --seeds; times ``bootstrap_accuracy`` with 1,000 resamples
plus the intervals and verdicts (median of a few runs).

    python benchmarks/bench_budgets.py [--resamples 1000] [--configs 10] [--budgets 10] [--images 10000]
                                       [--seeds 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from dynexit.analysis.budgets import bootstrap_accuracy, interval, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--configs", type=int, default=10)
    parser.add_argument("--budgets", type=int, default=10)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    accuracy = rng.uniform(0.7, 0.95, (args.configs, 1, args.budgets, 1))
    outcomes = list((rng.random((args.configs, args.seeds, args.budgets, args.images)) < accuracy)
                    .astype(np.float32))

    def once() -> None:
        samples = bootstrap_accuracy(outcomes, resamples=args.resamples, seed=1)
        low, high = interval(samples - samples[:, :1])
        verdicts(low, high)
        interval(samples)

    once()  # warm-up: BLAS threads, page faults
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print(f"{args.resamples} resamples x {args.configs} configurations x {args.seeds} seed(s) x {args.budgets} "
          f"budgets x {args.images} images: median {statistics.median(times):.2f} s over {args.repeats} runs "
          f"(min {min(times):.2f} s)")


if __name__ == "__main__":
    main()
