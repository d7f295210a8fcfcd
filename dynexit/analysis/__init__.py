"""An experiment's results turned into budgeted accuracy curves, ablation tables and exit-behaviour plots.

Everything starts from :func:`load_results` (``runs.csv``, ``curves.csv``, ``experiment.yaml`` and, for
exit behaviour, the run folders' logits). A *configuration* is a variant plus every grid key that
varies within it (except the seed); its runs differ only by seed, and every number shown for it is a
mean with a standard deviation over those seeds. Modules: ``results`` (loading), ``tables`` (ablation
table, per-run metrics, mean curves), ``behaviour`` (exit shares, exit accuracy, confidence),
``figures``, ``training_curves`` (per-exit metrics against epoch), ``search_figures``, ``budgets`` (accuracy at
budgets with bootstrap intervals and verdicts against the reference), ``evaluation`` (how the curves were
evaluated), ``latency`` (accuracy against measured latency), ``html_report`` (the self-contained page) and
``report``; the curve maths is :mod:`dynexit.curves`. Costs are GMACs, accuracies percent.
"""
from dynexit.analysis.behaviour import confidence_histograms, exit_accuracy, exit_shares
from dynexit.analysis.budgets import budget_table, budgets_latex, budgets_markdown, format_budgets
from dynexit.analysis.evaluation import describe_evaluation
from dynexit.analysis.figures import (
                                      ACC_LABEL,
                                      COST_LABEL,
                                      PUBLISHED,
                                      config_colors,
                                      plot_budgeted_curves,
                                      plot_confidence_histograms,
                                      plot_exit_accuracy,
                                      plot_exit_shares,
)
from dynexit.analysis.latency import expected_latency, measure_latency, plot_latency_curves
from dynexit.analysis.report import save_figure, write_report
from dynexit.analysis.results import (
                                      DEFAULT_RESULTS,
                                      REFERENCE_KEY,
                                      RESULTS_ENV,
                                      Results,
                                      find_results_dir,
                                      load_results,
)
from dynexit.analysis.tables import (
                                      ablation_table,
                                      budget_column,
                                      common_cost_range,
                                      cost_range,
                                      curve_band,
                                      default_budgets,
                                      exit_labels,
                                      format_ablation,
                                      run_metrics,
                                      to_latex,
                                      to_markdown,
)
from dynexit.analysis.training_curves import plot_training_curves, training_bands, training_history

__all__ = ["ACC_LABEL", "COST_LABEL", "DEFAULT_RESULTS", "PUBLISHED", "REFERENCE_KEY", "RESULTS_ENV", "Results",
    "ablation_table", "budget_column", "budget_table", "budgets_latex", "budgets_markdown", "common_cost_range",
    "confidence_histograms", "config_colors", "cost_range", "curve_band", "default_budgets", "describe_evaluation",
    "exit_accuracy", "exit_labels", "exit_shares", "expected_latency", "find_results_dir", "format_ablation",
    "format_budgets", "load_results", "measure_latency", "plot_budgeted_curves", "plot_confidence_histograms",
    "plot_exit_accuracy", "plot_exit_shares", "plot_latency_curves", "plot_training_curves", "run_metrics",
    "save_figure", "to_latex", "to_markdown", "training_bands", "training_history", "write_report",
]
