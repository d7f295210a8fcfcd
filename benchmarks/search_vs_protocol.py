"""Searched exit thresholds against the official budgeted protocol, at the test cost of every protocol point.

On the protocol fixture (tests/fixtures/protocol_seed1) and on the per-exit logits of any run folder the
runner wrote (logits_calib.npz, logits_test.npz, costs.csv). Two searches, both on the calibration split
only: a Pareto study (NSGA-II, 3000 trials) and one TPE study per budget (150 trials each) at 12 of the
protocol's calibration costs spread over the grid. Prints, per search, the smallest and mean difference
in test accuracy (searched minus protocol, points) over the protocol points inside the searched curve's
cost range, and the mean difference of the two curves over their shared cost range.

    python benchmarks/search_vs_protocol.py [RUN_DIR ...]
    python benchmarks/search_vs_protocol.py results/quickstart/runs/cedd982074
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from dynexit.logits import load_logits
from dynexit.search import (
    compare_with_protocol,
    protocol_budgets,
    protocol_curve,
    search_budgets,
    search_pareto,
    threshold_problem,
)

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "protocol_seed1"


def fixture_problem():
    arrays = np.load(FIXTURE.with_suffix(".npz"), allow_pickle=False)
    costs = json.loads(FIXTURE.with_suffix(".json").read_text())["costs"]
    return threshold_problem(arrays["calib_logits"], arrays["calib_targets"], arrays["test_logits"],
                             arrays["test_targets"], costs)


def run_problem(folder: Path):
    calib, test = load_logits(folder / "logits_calib.npz"), load_logits(folder / "logits_test.npz")
    costs = pd.read_csv(folder / "costs.csv")["gmacs"].to_numpy()
    return threshold_problem(*calib, *test, costs)


def compare(name: str, problem) -> None:
    protocol = protocol_curve(problem)
    budgets = protocol_budgets(problem)
    picked = sorted({budgets[i] for i in np.linspace(0, len(budgets) - 1, 12).round().astype(int)})
    searches = (("pareto, 3000 trials", lambda: search_pareto(problem, 3000, None, seed=0)),
                (f"{len(picked)} budgets x 150 trials", lambda: search_budgets(problem, picked, 150, None, seed=0)))
    print(f"\n{name}")
    for label, search in searches:
        start = time.perf_counter()
        result = search()
        seconds = time.perf_counter() - start
        attrs = compare_with_protocol(result.curve, protocol).attrs
        print(f"  {label:<24} {seconds:5.1f} s  points in range {attrs['points_in_range']:2d}  "
              f"min difference {attrs['min_difference']:+.3f}  mean {attrs['mean_difference']:+.3f}  "
              f"curves over shared range {attrs['area_difference']:+.3f} (test accuracy points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders written by 'dynexit run'")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    compare("protocol fixture (protocol_seed1)", fixture_problem())
    for folder in args.runs:
        compare(str(folder), run_problem(folder))


if __name__ == "__main__":
    main()
