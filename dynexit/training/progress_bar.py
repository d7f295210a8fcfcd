"""Whether the training loop shows its per-epoch progress bar.

``train.progress`` decides (None: only when stderr is a terminal), except in the runner's worker processes:
several of them drawing bars on one terminal interleave, so the runner sets :data:`NO_BAR_ENV` in them and only
its own progress log shows. An environment variable, not the configuration, so run ids do not change.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

NO_BAR_ENV = "DYNEXIT_NO_PROGRESS_BAR"


def show_progress_bar(setting: Optional[bool], is_main: bool = True) -> bool:
    """True when this process should draw the epoch's bar: the main process, outside a runner worker, as
    ``setting`` (``train.progress``) says or, when it is None, when stderr is a terminal."""
    if not is_main or os.environ.get(NO_BAR_ENV) == "1":
        return False
    return setting if setting is not None else sys.stderr.isatty()
