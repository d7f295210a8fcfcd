"""An experiment's results turned into budgeted accuracy curves, ablation tables and exit-behaviour plots."""
from dynexit.analysis.tables import *  # noqa: F401,F403 - split into modules in the next commit
from dynexit.analysis.tables import PUBLISHED, RESULTS_ENV, max_softmax  # noqa: F401
