"""Loading an experiment's results: :func:`load_results` reads ``runs.csv``, ``curves.csv`` and
``experiment.yaml`` (and, for what runs.csv lacks, the run folders) into a :class:`Results`.

A *configuration* is a variant plus every grid key that varies within it (except the seed); its runs
differ only by seed, and every number shown for it is a mean with a standard deviation over those seeds.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

RESULTS_ENV = "DYNEXIT_RESULTS"  # the notebooks' results folder
DEFAULT_RESULTS = "results/quickstart"
REFERENCE_KEY = "reference"  # a spec's reference variant (else the first variant with a curve)


# ------------------------------------------------------------------------------------------ loading

@dataclass
class Results:
    """An experiment's results, one row per run (``runs``) and per run and operating point (``curves``).

    Both frames carry a ``config`` column (the configuration's label). ``exits`` has one row per run
    and exit (``accuracy`` of the exit alone, cumulative ``gmacs``). ``configs`` lists the labels in
    display order, the reference (the ``full`` variant, else the first) first.
    """

    path: Path
    name: str
    runs: pd.DataFrame
    curves: pd.DataFrame
    exits: pd.DataFrame
    exit_names: list[str]
    config_keys: list[str]
    configs: list[str]
    static_configs: list[str]
    reference: str
    budgets: list[float]
    spec: dict = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # run folders not in runs.csv -> why
    mixed: list[str] = field(default_factory=list)  # configurations pooled over different evaluations

    @property
    def dynamic_configs(self) -> list[str]:
        """Configurations with a curve (more than one exit), in display order."""
        return [c for c in self.configs if c not in self.static_configs]

    def run_folder(self, run_id: str) -> Path:
        return self.path / "runs" / str(run_id)

    def run_exits(self, run_id: str) -> list[str]:
        """The exits of one run, in exit order."""
        rows = self.exits[self.exits["run_id"] == run_id]
        return rows.sort_values("position")["exit"].tolist()

    def curve(self, run_id: str) -> pd.DataFrame:
        """The operating points of one run, sorted by test cost."""
        return self.curves[self.curves["run_id"] == run_id].sort_values("test_expected_cost")


def find_results_dir(default: str = DEFAULT_RESULTS, env: str = RESULTS_ENV) -> Path:
    """The results folder named by the environment variable ``env`` (else ``default``); a relative path
    is looked up from the working directory and its parents (a notebook runs in ``notebooks/``)."""
    name = os.environ.get(env) or default
    path = Path(name)
    if path.is_absolute():
        return path
    for base in [Path.cwd(), *Path.cwd().parents]:
        if (base / path).is_dir():
            return base / path
    return path


def load_results(results_dir: str | Path, allow_mixed: bool = False) -> Results:
    """Reads an experiment's results folder (``runs.csv``, ``curves.csv``, ``experiment.yaml``).

    Runs of one configuration evaluated differently (runs.csv's ``eval.*`` columns) are not pooled: ValueError naming
    them, unless ``allow_mixed`` (then ``Results.mixed`` lists the configurations, and the report says so).
    Run folders that runs.csv leaves out (not finished, failed, or an incomplete evaluation) are listed in
    ``Results.left_out`` with the reason."""
    path = Path(results_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"results folder not found: {path}")
    runs = _read_csv(path / "runs.csv")
    if runs.empty:
        raise ValueError(f"{path / 'runs.csv'} lists no finished run")
    for column in ("run_id", "variant", "seed"):
        if column not in runs.columns:
            raise ValueError(f"{path / 'runs.csv'} has no {column!r} column")
    runs["run_id"] = runs["run_id"].astype(str)
    runs["variant"] = runs["variant"].astype(str)
    spec = read_spec(path / "experiment.yaml")

    run_exit_names = {rid: _exits_of(row, path / "runs" / rid / "costs.csv")
                      for rid, row in zip(runs["run_id"], runs.to_dict("records"))}
    for rid, names in run_exit_names.items():
        if not names:
            raise ValueError(f"{path / 'runs.csv'}: run {rid} has no acc_<exit>/gmacs_<exit> columns")

    config_keys = _config_keys(runs)
    runs.insert(1, "config", [_label(row, config_keys) for row in runs.to_dict("records")])
    mixed = _mixed_evaluations(runs, path / "runs.csv", allow_mixed)
    num_exits = runs["run_id"].map(lambda rid: len(run_exit_names[rid]))
    with_curve = list(dict.fromkeys(runs.loc[num_exits > 1, "variant"]))
    configs, reference = _order_configs(runs, config_keys, list((spec.get("variants") or {}).keys()),
                                        spec.get(REFERENCE_KEY), with_curve, path / "experiment.yaml")
    runs = _in_display_order(runs, configs)
    exit_names = _union_in_order(run_exit_names[rid] for rid in runs["run_id"])
    num_exits = runs["run_id"].map(lambda rid: len(run_exit_names[rid]))
    static = [c for c in configs if (num_exits[runs["config"] == c] == 1).all()]

    curves = _load_curves(path, runs)
    exits = pd.DataFrame([
        {"config": cfg, "run_id": rid, "seed": seed, "exit": name, "position": k,
         "accuracy": float(row[f"acc_{name}"]), "gmacs": float(row[f"gmacs_{name}"])}
        for rid, cfg, seed, row in zip(runs["run_id"], runs["config"], runs["seed"], runs.to_dict("records"))
        for k, name in enumerate(run_exit_names[rid])])
    budgets = [float(c[len("acc_at_"):]) for c in runs.columns if re.fullmatch(r"acc_at_[-+.0-9eE]+", c)]
    return Results(path=path, name=str(spec.get("name") or path.name), runs=runs, curves=curves, exits=exits,
                   exit_names=exit_names, config_keys=config_keys, configs=configs, static_configs=static,
                   reference=reference, budgets=budgets, spec=spec, left_out=_left_out(path, runs),
                   mixed=mixed)


def _mixed_evaluations(runs: pd.DataFrame, where: Path, allow_mixed: bool) -> list[str]:
    """The configurations whose runs were evaluated differently; ValueError naming them unless allowed."""
    from dynexit.runs.aggregate import EVAL_COLUMNS  # what runs.csv records of each run's evaluation

    columns = [c for c in EVAL_COLUMNS if c in runs.columns]
    if not columns:  # a runs.csv written before it recorded evaluations: nothing to compare
        return []
    mixed, lines = [], []
    for config, group in runs.groupby("config", sort=False):
        settings = group[columns].astype(str).drop_duplicates()
        if len(settings) > 1:
            mixed.append(str(config))
            described = "; ".join(f"run {rid}: " + ", ".join(f"{c}={row[c]}" for c in columns)
                                  for rid, row in zip(group["run_id"], group[columns].astype(str).to_dict("records")))
            lines.append(f"{config} ({described})")
    if mixed and not allow_mixed:
        raise ValueError(f"{where}: runs of one configuration were evaluated differently, so their curves cannot "
                         f"be pooled: {' | '.join(lines)}. Evaluate them alike ('dynexit run' with the spec's "
                         f"eval settings re-evaluates stale runs), or pass --allow-mixed to pool them anyway")
    return mixed


def _left_out(path: Path, runs: pd.DataFrame) -> dict[str, str]:
    """Run folders of the results folder that runs.csv does not list, with what their status says."""
    listed = set(runs["run_id"])
    folders = sorted(p for p in (path / "runs").iterdir() if p.is_dir()) if (path / "runs").is_dir() else []
    out = {}
    for folder in folders:
        if folder.name in listed:
            continue
        try:
            status = json.loads((folder / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        state = status.get("state", "not started") if isinstance(status, dict) else "unreadable status"
        error = status.get("error") if isinstance(status, dict) else ""
        out[folder.name] = f"{state}: {error}" if error else str(state)
    return out


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {path.parent} an experiment's results folder?")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_spec(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: cannot parse YAML: {err}") from None
    return spec if isinstance(spec, dict) else {}


def _exits_of(row: dict, costs: Path) -> list[str]:
    """A run's exits (those with an accuracy and a cost in runs.csv), in exit order: the order of the
    run's ``costs.csv`` when it has one, else by cumulative cost (ties keep the column order)."""
    names = [k[4:] for k in row if k.startswith("acc_") and k != "acc_final" and not k.startswith("acc_at_")]
    names = [n for n in names if f"gmacs_{n}" in row and _finite(row[f"acc_{n}"]) and _finite(row[f"gmacs_{n}"])]
    if costs.is_file():
        order = [str(e) for e in pd.read_csv(costs).get("exit", pd.Series(dtype=str))]
        if set(names) <= set(order):
            return [n for n in order if n in names]
    return sorted(names, key=lambda n: float(row[f"gmacs_{n}"]))


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _union_in_order(orders: Iterable[list[str]]) -> list[str]:
    """Exit names of all runs: the longest run's order, then names it lacks."""
    out: list[str] = []
    for names in sorted(orders, key=len, reverse=True):
        out += [n for n in names if n not in out]
    return out


def _config_keys(runs: pd.DataFrame) -> list[str]:
    """Identifying columns that split a variant into configurations: the grid keys (the columns
    between ``seed`` and ``params``), model and data names, whichever take several values within a
    variant. Keys that only a variant sets (``model.x2z`` of ``no_x2z``) are part of the variant."""
    cols = list(runs.columns)
    grid = cols[cols.index("seed") + 1: cols.index("params")] if "params" in cols else []
    candidates = [c for c in ["model.name", "data.name", *grid] if c in cols and c != "seed"]
    keys = []
    for key in dict.fromkeys(candidates):
        values = runs[key].astype(str)  # NaN and None count as one value
        if (values.groupby(runs["variant"]).nunique() > 1).any():
            keys.append(key)
    return keys


def _format_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _label(row: dict, keys: Sequence[str]) -> str:
    if not keys:
        return str(row["variant"])
    return f"{row['variant']} (" + ", ".join(f"{k}={_format_value(row[k])}" for k in keys) + ")"


def _order_configs(runs: pd.DataFrame, keys: list[str], spec_variants: list[str], given: str | None,
                   with_curve: list[str], spec_path: Path) -> tuple[list[str], str]:
    """Configurations in display order (reference variant first, then the spec's variant order, then
    grid values) and the reference variant: ``given`` (the spec's ``reference:``), else the first variant
    with a curve, else the first variant."""
    seen = list(dict.fromkeys(runs["variant"]))
    variants = [v for v in spec_variants if v in seen] + [v for v in seen if v not in spec_variants]
    if given is not None:
        if str(given) not in variants:
            raise ValueError(f"{spec_path}: {REFERENCE_KEY}: {given!r} is not a variant with runs "
                             f"({', '.join(variants)})")
        reference = str(given)
    else:
        reference = next((v for v in variants if v in with_curve), variants[0])
    variants.remove(reference)
    variants.insert(0, reference)
    rank = {v: i for i, v in enumerate(variants)}
    table = runs.drop_duplicates("config")[["config", "variant", *keys]].copy()
    table["_rank"] = table["variant"].map(rank)
    table = table.sort_values(["_rank", *keys], kind="stable", key=_sort_key)
    return table["config"].tolist(), reference


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers sort as numbers; a column holding anything else sorts as text."""
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers.notna().sum() == column.notna().sum() else column.astype(str)


def _in_display_order(runs: pd.DataFrame, configs: list[str]) -> pd.DataFrame:
    """Runs sorted by configuration (display order), seed and run id: every table and figure then follows
    a fixed order, whatever the order of runs.csv's rows."""
    rank = {config: i for i, config in enumerate(configs)}
    ordered = runs.assign(_rank=runs["config"].map(rank)).sort_values(["_rank", "seed", "run_id"], kind="stable",
                                                                       key=_sort_key)
    return ordered.drop(columns="_rank").reset_index(drop=True)


def _load_curves(path: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """curves.csv, completed from run folders (``curve.csv``) for runs it lacks; with ``config``."""
    curves = _read_csv(path / "curves.csv") if (path / "curves.csv").is_file() else pd.DataFrame()
    if not curves.empty:
        for column in ("run_id", "test_expected_cost", "test_accuracy"):
            if column not in curves.columns:
                raise ValueError(f"{path / 'curves.csv'} has no {column!r} column")
        curves["run_id"] = curves["run_id"].astype(str)
        curves = curves[curves["run_id"].isin(runs["run_id"])]
    have = set(curves["run_id"]) if not curves.empty else set()
    extra = []
    for rid in runs["run_id"]:
        folder_curve = path / "runs" / rid / "curve.csv"
        if rid not in have and folder_curve.is_file():
            one = pd.read_csv(folder_curve)
            one["run_id"] = rid
            if "point" not in one.columns:
                one["point"] = range(len(one))
            extra.append(one)
    if extra:
        curves = pd.concat([curves, *extra], ignore_index=True)
    missing = sorted(set(runs["run_id"]) - (set(curves["run_id"]) if not curves.empty else set()))
    if missing:
        raise ValueError(f"{path}: no curve for run(s) {', '.join(missing)} (neither in curves.csv nor in "
                         "the run folders)")
    ids = runs[["run_id", "config", "seed"]]
    curves = curves.drop(columns=[c for c in ("config", "seed") if c in curves.columns])
    curves = curves.merge(ids, on="run_id", how="left")
    if "point" not in curves.columns:
        curves["point"] = curves.groupby("run_id").cumcount()
    first = ["run_id", "config", "seed", "point"]
    rank = {rid: i for i, rid in enumerate(runs["run_id"])}  # the runs' order, then each run's points in order
    curves = curves.sort_values(["run_id", "point"], kind="stable",
                                key=lambda column: column.map(rank) if column.name == "run_id" else column)
    return curves[first + [c for c in curves.columns if c not in first]].reset_index(drop=True)
