"""Optuna searches: exit thresholds on saved logits, and training loss weights.

* :mod:`dynexit.search.thresholds`: thresholds for cost budgets (TPE with a cost constraint, one study per
  budget) or a Pareto front of accuracy against cost (NSGA-II), searched on the calibration split and
  applied once to the test split (``dynexit search thresholds``).
* :mod:`dynexit.search.loss_weights`: per-exit loss weights and self-distillation weight and temperature,
  each trial a short training run; the objective is the mean calibration budgeted accuracy over a fixed
  cost range, reported every epoch so that a median pruner stops poor trials (``dynexit search
  loss-weights``).
* :mod:`dynexit.search.study`: storage, study creation and a trial loop that several worker processes
  (on one machine with SQLite, on several with PostgreSQL or MySQL) share without losing or duplicating
  trials; a study killed midway resumes with the same command.

Watching a study: the studies live in an Optuna storage (by default an SQLite file: ``search.db`` next to
the threshold curve, ``study.db`` in the loss-weight study folder). ``pip install optuna-dashboard`` and
run ``optuna-dashboard sqlite:///path/to/study.db`` (or the PostgreSQL/MySQL URL given to ``--storage``),
then open http://127.0.0.1:8080: trials, parameters, intermediate values (per-epoch calibration scores
of loss-weight trials, pruned ones included), Pareto fronts and parameter importances.
"""
from dynexit.search.loss_weights import LossWeightSearch, LossWeightSpace, budgeted_area, search_loss_weights
from dynexit.search.study import SearchStorage, open_storage, open_study, run_quick_trials, run_trials, sqlite_url
from dynexit.search.thresholds import (
                                       ThresholdProblem,
                                       ThresholdSearch,
                                       budget_verdict,
                                       compare_at_budgets,
                                       compare_with_protocol,
                                       curve_of_thresholds,
                                       protocol_budgets,
                                       protocol_curve,
                                       search_budgets,
                                       search_pareto,
                                       threshold_problem,
)

__all__ = ["LossWeightSearch", "LossWeightSpace", "SearchStorage", "ThresholdProblem", "ThresholdSearch",
           "budget_verdict", "budgeted_area", "compare_at_budgets", "compare_with_protocol", "curve_of_thresholds",
           "open_storage", "open_study", "protocol_budgets", "protocol_curve", "run_quick_trials", "run_trials",
           "search_budgets", "search_loss_weights", "search_pareto", "sqlite_url", "threshold_problem"]
