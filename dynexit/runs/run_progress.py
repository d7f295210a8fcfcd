"""How far a running run is, from its folder's files only (so another terminal can tell): the epoch it has
finished out of ``train.epochs`` (``config.yaml``), its last evaluated accuracy at the last exit and an
estimate of the time left (``metrics.csv``: the remaining epochs at the mean time an epoch has taken)."""
from __future__ import annotations

import math
from pathlib import Path

from dynexit.training.metrics import METRICS_FILE
from dynexit.training.state import CONFIG_FILE
from dynexit.utils import read_csv_file
from dynexit.yaml_files import read_yaml

# Accuracy columns in the order they are preferred: test, then calibration (``{split}_acc_{exit}``).
ACCURACY_SPLITS = ("test", "calib")


def run_progress(folder: Path) -> dict:
    """``{"epoch", "epochs", "accuracy", "accuracy_column", "seconds_left"}`` for the run in ``folder``;
    ``epoch`` is 0 before the first epoch ends; ``epochs`` is None before training has written its
    ``config.yaml``; ``accuracy`` and ``seconds_left`` are None while unknown."""
    folder = Path(folder)
    epochs = None
    if (folder / CONFIG_FILE).is_file():
        config = read_yaml(folder / CONFIG_FILE, "run configuration") or {}
        try:
            epochs = int(config["train"]["epochs"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{folder / CONFIG_FILE}: no integer train.epochs") from None
    path = folder / METRICS_FILE
    rows = read_csv_file(path, "metrics file") if path.is_file() else None
    if rows is None or rows.empty:
        return {"epoch": 0, "epochs": epochs, "accuracy": None, "accuracy_column": None, "seconds_left": None}
    if "epoch" not in rows:
        raise ValueError(f"{path}: no 'epoch' column")
    epoch = int(rows["epoch"].iloc[-1])
    accuracy, column = _last_accuracy(rows)
    seconds_left = None
    if epochs is not None and "epoch_time" in rows and rows["epoch_time"].notna().any():
        seconds_left = max(0, epochs - epoch) * float(rows["epoch_time"].dropna().mean())
    return {"epoch": epoch, "epochs": epochs, "accuracy": accuracy, "accuracy_column": column,
            "seconds_left": seconds_left}


def _last_accuracy(rows) -> tuple[float | None, str | None]:
    """The last exit's accuracy in the last row that was evaluated (its test accuracy, else its calibration
    one). The columns of a split follow the model's exits in order, so the last one is the last exit."""
    columns = []
    for split in ACCURACY_SPLITS:
        of_split = [c for c in rows.columns if c.startswith(f"{split}_acc_")]
        columns += of_split[-1:]
    if not columns:
        return None, None
    evaluated = rows[columns].dropna(how="all")
    if evaluated.empty:
        return None, None
    last = evaluated.iloc[-1]
    column = next(c for c in columns if not math.isnan(float(last[c])))
    return float(last[column]), column
