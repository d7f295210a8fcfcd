"""ExitPolicy: a complete early-exit rule, its checks, and its JSON and curve-row forms."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dynexit.policies.criteria import CRITERIA
from dynexit.policies.thresholds import ALWAYS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

POLICY_FORMAT = "dynexit-exit-policy"  # the "format" field of a saved policy
POLICY_VERSION = 1
_POLICY_FIELDS = ("exit_names", "criterion", "temperatures", "thresholds")


@dataclass(frozen=True)
class ExitPolicy:
    """A complete early-exit rule, the argument of :func:`dynexit.inference.early_exit`: a sample leaves at the
    first exit whose ``criterion`` confidence (at ``temperatures``, one per exit, or None) is >= that exit's
    threshold; the last exit takes everyone left, so its threshold must be ``ALWAYS`` (-1e8) or lower.

    Every row of a curve (:func:`budgeted_curve`, ``dynexit curve``, ``dynexit search thresholds``, a run's
    curve.csv) is one: see :meth:`from_curve`. :meth:`save` / :meth:`load` keep it as JSON. Validated on
    construction: a ValueError or TypeError names the field.
    """

    exit_names: tuple[str, ...]
    criterion: str
    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...] | None = None

    def __post_init__(self):
        names = self.exit_names
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise TypeError(f"exit_names: need a non-empty list of exit names, got {names!r}")
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"exit_names: need distinct non-empty strings, got {list(names)!r}")
        object.__setattr__(self, "exit_names", tuple(names))
        if not isinstance(self.criterion, str) or self.criterion not in CRITERIA:
            raise ValueError(f"criterion: unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        object.__setattr__(self, "thresholds", self._numbers("thresholds", self.thresholds))
        if any(np.isnan(t) for t in self.thresholds):
            raise ValueError(f"thresholds: must not be NaN, got {list(self.thresholds)}")
        if self.thresholds[-1] > ALWAYS:
            raise ValueError(f"thresholds: the last exit ({names[-1]!r}) takes everyone left, so its threshold "
                             f"must be {float(ALWAYS):g} (ALWAYS) or lower, got {self.thresholds[-1]!r}")
        if self.temperatures is not None:
            temps = self._numbers("temperatures", self.temperatures)
            if not all(np.isfinite(t) and t > 0 for t in temps):
                raise ValueError(f"temperatures: must be finite and positive, got {list(temps)}")
            object.__setattr__(self, "temperatures", temps)

    def _numbers(self, field: str, values) -> tuple[float, ...]:
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
            raise TypeError(f"{field}: need one number per exit, got {values!r}")
        if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                   for v in values):
            raise TypeError(f"{field}: need numbers, got {list(values)!r}")
        if len(values) != len(self.exit_names):
            raise ValueError(f"{field}: need one per exit ({len(self.exit_names)}: "
                             f"{', '.join(self.exit_names)}), got {len(values)}")
        return tuple(float(v) for v in values)

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    # ---------------------------------------------------------------------------------- from curves

    @classmethod
    def from_curve(cls, curve, budget: float | None = None, point: int | None = None,
                   run_id: str | None = None) -> ExitPolicy:
        """The policy of one row of a curve (a CSV path or a DataFrame with ``threshold_<exit>`` columns).

        ``budget=B``: the row with the highest CALIBRATION accuracy among those whose CALIBRATION expected
        cost (``calib_expected_cost``) is <= B; ties go to the lower calibration cost, then the earlier row.
        Calibration figures, because thresholds are chosen on calibration data only: the test columns are the
        held-out estimate of how the chosen policy does, and choosing by them would make it optimistic.
        ``point=i``: the row whose ``point`` is i (the row at position i when there is no ``point`` column).
        ``run_id``: the run to take the row from, in an experiment's curves.csv (needed when it holds several).

        Curves written before the criterion and temperatures were recorded load as ``max_softmax`` without
        temperature (what those curves used by default).
        """
        import pandas as pd

        from dynexit.utils import read_csv_file

        if (budget is None) == (point is None):
            raise ValueError("give exactly one of budget= and point=")
        where = "curve"
        if isinstance(curve, pd.DataFrame):
            frame = curve
        else:
            where = str(curve)
            frame = read_csv_file(curve, "curve file")  # pandas reads floats back bit for bit
        frame = one_run(frame, run_id, where)
        names = [c[len("threshold_"):] for c in frame.columns
                 if c.startswith("threshold_") and frame[c].notna().any()]
        if not names:
            raise ValueError(f"{where}: no threshold_<exit> columns: not a curve of exit thresholds")
        if budget is not None:
            row = row_within_budget(frame, float(budget), where)
        else:
            row = row_at_point(frame, point, where)
        label = f"{where}, point {row.get('point', row.name)}"
        criterion = "max_softmax"
        if "criterion" in frame.columns and pd.notna(row["criterion"]):
            criterion = str(row["criterion"])
        else:
            log.info("%s has no criterion column: max_softmax, no temperature (a curve of an earlier version)", where)
        temps = [row.get(f"temperature_{n}", np.nan) for n in names]
        given = [pd.notna(t) for t in temps]
        if any(given) and not all(given):
            raise ValueError(f"{label}: temperatures given for some exits only: "
                             f"{', '.join(f'{n}={t}' for n, t in zip(names, temps))}")
        try:
            return cls(tuple(names), criterion, tuple(float(row[f"threshold_{n}"]) for n in names),
                       tuple(float(t) for t in temps) if all(given) else None)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{label}: {err}") from None

    # ------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "exit_names": list(self.exit_names),
                "criterion": self.criterion,
                "temperatures": None if self.temperatures is None else list(self.temperatures),
                "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data, where: str = "policy") -> ExitPolicy:
        """The policy of :meth:`to_dict`'s mapping; errors name ``where`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: need a JSON object with fields {', '.join(_POLICY_FIELDS)}, "
                             f"got {type(data).__name__}")
        if data.get("format") != POLICY_FORMAT:
            raise ValueError(f"{where}: field 'format' must be {POLICY_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != POLICY_VERSION:
            raise ValueError(f"{where}: field 'version' must be {POLICY_VERSION}, got {data.get('version')!r}")
        unknown = sorted(set(data) - set(_POLICY_FIELDS) - {"format", "version"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(_POLICY_FIELDS)}")
        missing = [f for f in ("exit_names", "criterion", "thresholds") if f not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
        try:
            return cls(data["exit_names"], data["criterion"], data["thresholds"], data.get("temperatures"))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: field {err}") from None

    def save(self, path) -> None:
        """Writes the policy as JSON, atomically (a reader never sees half a file)."""
        import json

        from dynexit.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> ExitPolicy:
        """Reads a policy written by :meth:`save`; a missing, malformed or invalid file is an error naming it."""
        from dynexit.utils import read_json_file

        return cls.from_dict(read_json_file(path, "exit policy file"), str(path))


def one_run(frame: pd.DataFrame, run_id: str | None, where: str) -> pd.DataFrame:
    if "run_id" in frame.columns:
        ids = [str(r) for r in frame["run_id"].unique()]
        if run_id is not None:
            if str(run_id) not in ids:
                raise ValueError(f"{where}: no run {run_id!r}; runs: {', '.join(ids)}")
            return frame[frame["run_id"].astype(str) == str(run_id)]
        if len(ids) > 1:
            raise ValueError(f"{where} holds the curves of {len(ids)} runs; choose one with run_id= "
                             f"({', '.join(ids)})")
    elif run_id is not None:
        raise ValueError(f"{where} has no run_id column: it is the curve of one run")
    if frame.empty:
        raise ValueError(f"{where}: the curve has no rows")
    return frame


def row_within_budget(frame: pd.DataFrame, budget: float, where: str) -> pd.Series:
    for column in ("calib_accuracy", "calib_expected_cost"):
        if column not in frame.columns:
            raise ValueError(f"{where}: no {column!r} column, needed to choose a row by budget")
    if not np.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget}")
    within = frame[frame["calib_expected_cost"] <= budget]
    if within.empty:
        raise ValueError(f"{where}: no operating point within budget {budget:g}: the cheapest costs "
                         f"{frame['calib_expected_cost'].min():g} on the calibration split")
    order = within.assign(_position=np.arange(len(within)))
    order = order.sort_values(["calib_accuracy", "calib_expected_cost", "_position"],
                              ascending=[False, True, True], kind="stable")
    return within.iloc[int(order["_position"].iloc[0])]


def row_at_point(frame: pd.DataFrame, point: int, where: str) -> pd.Series:
    if "point" in frame.columns:
        rows = frame[frame["point"] == point]
        if rows.empty:
            raise ValueError(f"{where}: no point {point}; points: {frame['point'].min()}..{frame['point'].max()}")
        return rows.iloc[0]
    if not 0 <= point < len(frame):
        raise ValueError(f"{where}: no point {point}; the curve has {len(frame)} rows")
    return frame.iloc[point]
