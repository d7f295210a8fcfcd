"""Figures and tables of the quickstart experiment (experiments/quickstart.yaml).

    python analysis/quickstart.py [RESULTS_DIR]      # default: results/quickstart

Writes RESULTS_DIR/report/: budgeted_curves, exit_shares, exit_accuracy, confidence (PNG, PDF) and the
ablation table (CSV, Markdown, LaTeX), at the spec's eval.budgets; the same as
`dynexit report RESULTS_DIR` (`make quickstart` runs it on its own results in runs/quickstart).
"""
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from dynexit.analysis import write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "quickstart"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = write_report(argv[0] if argv else RESULTS)
    for item, paths in written.items():
        print(f"{item}: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
