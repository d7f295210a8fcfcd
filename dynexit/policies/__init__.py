"""Exit policies: confidence criteria, thresholds and the budgeted protocol, vectorized over samples.

One module per concern: :mod:`.checks` (the arrays taken), :mod:`.criteria` (confidence, temperatures),
:mod:`.thresholds` (the protocol's thresholds), :mod:`.grids` (target shares), :mod:`.curves` (budgeted
curves), :mod:`.exit_policy` (ExitPolicy and its files); every public name is importable from here.

Layout: per-exit logits are one array of shape (exits, samples, classes); confidences, predictions
and correctness are (exits, samples). Nothing here loops over samples in Python.

Exit policy: a sample leaves at the first exit whose confidence is >= that exit's threshold; the last
exit takes everyone left, whatever its threshold. Thresholds never look at labels.

Budgeted protocol (Dynamic Perceiver / MSDNet): for a row of target shares p (one per exit), the
threshold of exit k < K-1 is the confidence of the n_k-th most confident calibration sample among
those that have not exited yet, n_k = floor(N * p_k); it is ``NEVER`` (1e8) when n_k is 0 or fewer
samples remain, ``ALWAYS`` (-1e8) when n_k is every sample left (a share that sends everyone there, such
as the full grid's first point: on the test split too, everyone leaves there; the papers' grids never
ask for it), and the last exit gets ``ALWAYS``. The numbers follow the official float32
arithmetic: softmax in torch float32, n_k computed in float32, thresholds float32, expected cost
accumulated in float32, so thresholds equal the official ones bit for bit.

Columns of :func:`budgeted_curve` (one row per operating point, in grid order), where ``<e>`` is the
exit name when ``exit_names`` is given and the 0-based exit index otherwise:
``point`` (row of the grid), ``target_share_<e>``, ``threshold_<e>``, ``criterion``, ``temperature_<e>``
(empty when no temperature was used; with the thresholds, these make each row a complete
:class:`ExitPolicy`), ``calib_accuracy``,
``calib_expected_cost``, ``test_accuracy``, ``test_expected_cost`` (accuracies in percent, costs in
the unit of ``costs``), ``calib_share_<e>`` and ``test_share_<e>`` (fraction of the split exiting at
each exit).

Exit scoring (:func:`exit_scores`) is the one implementation of the criteria: the simulated policy here and
real early exit (:mod:`dynexit.inference`) both call it. torch and pandas are imported by the functions
that use them, so that the command line can read ``CRITERIA`` and ``GRIDS`` without loading them.
"""
from __future__ import annotations

from dynexit.policies.checks import (
    as_costs,
    as_logits,
    as_targets,
    as_temperatures,
    check_costs,
    exit_labels,
    is_tensor,
)
from dynexit.policies.criteria import CRITERIA, check_criterion, confidence, exit_scores, fit_temperatures, scores
from dynexit.policies.curves import anytime_accuracy, budgeted_curve, curve_from_scores, policy_columns
from dynexit.policies.exit_policy import (
    POLICY_FORMAT,
    POLICY_VERSION,
    ExitPolicy,
    one_run,
    row_at_point,
    row_within_budget,
)
from dynexit.policies.grids import (
    DEFAULT_GRID,
    FULL_MAX_GAP,
    FULL_MIN_POINTS,
    FULL_SPAN,
    GRIDS,
    OFFICIAL_SCALES,
    full_grid,
    msdnet_grid,
    official_grid,
    resolve_grid,
)
from dynexit.policies.thresholds import ALWAYS, NEVER, SplitResult, assign_exits, evaluate_thresholds, find_thresholds

__all__ = [
    "ALWAYS", "CRITERIA", "DEFAULT_GRID", "ExitPolicy", "FULL_MAX_GAP", "FULL_MIN_POINTS", "FULL_SPAN", "GRIDS",
    "NEVER", "OFFICIAL_SCALES", "POLICY_FORMAT", "POLICY_VERSION", "SplitResult", "anytime_accuracy", "as_costs",
    "as_logits", "as_targets", "as_temperatures", "assign_exits", "budgeted_curve", "check_costs", "check_criterion",
    "confidence", "curve_from_scores", "evaluate_thresholds", "exit_labels", "exit_scores", "find_thresholds",
    "fit_temperatures", "full_grid", "is_tensor", "msdnet_grid", "official_grid", "one_run", "policy_columns",
    "resolve_grid", "row_at_point", "row_within_budget", "scores",
]
