"""Options shared by several commands, declared once, and the readers of their values.

One name per concept, in every command: ``--out`` is where a command writes (a file or a folder, as its help
says), ``--devices`` the devices it computes on, ``--grid`` a protocol grid by name (full, official, msdnet),
``--budgets`` costs in GMACs. Older spellings stay as hidden aliases (:func:`add_hidden_alias`) for one release.

Nothing here imports torch, pandas or the models at import time: ``dynexit --help`` and every command's
``--help`` answer without loading them; the readers import what they need when a command runs.

``--set KEY=VALUE`` means one thing in every command: KEY is a dotted key of a run configuration
(``model.x2z=false``, ``train.epochs=3``, ``data.image_size=64``, ``seed=1``) and VALUE is parsed as YAML.
Commands that build a model from a preset name (costs, bench, convert-official) take ``model.*`` keys only.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dynexit.policies import CRITERIA, DEFAULT_GRID, GRIDS

SET_RULE = """--set KEY=VALUE means the same in every command: KEY is a dotted key of a run configuration
(model.x2z=false, train.epochs=3, data.image_size=64, seed=1) and VALUE is YAML; the commands that build
a model from a preset (costs, bench, convert-official) take model.* keys only."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and example epilogs."""


MODEL_RULE = ("a model is a preset (see 'dynexit models') or your own factory, named as package.module:function "
              "(in a spec: model: {factory: \"package.module:function\", ...})")


def add_hidden_alias(parser: argparse.ArgumentParser, option: str, dest: str, **kwargs: Any) -> None:
    """An older spelling of an option: parsed into the same ``dest``, left out of ``--help``."""
    parser.add_argument(option, dest=dest, help=argparse.SUPPRESS, **kwargs)


# ------------------------------------------------------------------------------------------- --set

def add_set(parser: argparse.ArgumentParser, model_only: bool = False) -> None:
    """``--set KEY=VALUE`` (repeatable), with the rule in its help."""
    scope = ("model.* keys of a run configuration (e.g. model.x2z=false, model.depth_factor=[1,1,1,1])"
             if model_only else "dotted keys of a run configuration (e.g. train.epochs=3, model.x2z=false)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {scope}; VALUE is YAML; repeatable")


def model_set(items: list[str], command: str) -> dict[str, Any]:
    """The model overrides of ``--set`` items for a command that builds a model from a preset: the
    ``model.*`` keys without their prefix (VALUE parsed as YAML); the model's own configuration checks each key
    and type when the model is built. Other keys, and plain ones (``x2z=false``), are errors that show the
    right spelling."""
    from omegaconf import OmegaConf

    from dynexit.config import RunConfig, parse_set

    tree = OmegaConf.to_container(parse_set(items), resolve=True)
    sections = set(RunConfig.__dataclass_fields__)
    for key in tree:
        if key not in sections:
            raise ValueError(f"--set {key}=...: keys are dotted keys of a run configuration; write model.{key}=...")
        if key != "model":
            raise ValueError(f"--set {key}...: '{command}' builds a model, so it takes model.* keys only")
    model = tree.get("model") or {}
    if not isinstance(model, dict):
        raise ValueError("--set model=...: give one key of the model at a time (model.x2z=false)")
    if "name" in model:
        raise ValueError(f"--set model.name=...: '{command}' takes the model's name as its argument")
    return model  # each model family's configuration checks its keys and types when the model is built


# ------------------------------------------------------------------------------------------ models

def add_model(parser: argparse.ArgumentParser) -> None:
    """NAME, --input-size, --num-classes and --set (model.* keys): a model built from a preset."""
    parser.add_argument("name", metavar="NAME", help="model preset (see 'dynexit models'), or your own factory as "
                                                     "package.module:function")
    parser.add_argument("--input-size", type=int, metavar="N", help="image size in pixels (default: the preset's)")
    parser.add_argument("--num-classes", type=int, metavar="C", help="number of classes (default: the preset's)")
    add_set(parser, model_only=True)


def add_op_handles(parser: argparse.ArgumentParser) -> None:
    """``--op-handle OP=zero|package.module:function`` (repeatable): how fvcore counts an op it cannot."""
    parser.add_argument("--op-handle", action="append", default=[], metavar="OP=HANDLE", dest="op_handles",
                        help="count the op OP (e.g. aten::cumsum) as zero multiply-adds (OP=zero) or with your "
                             "fvcore handle (OP=package.module:function); repeatable")


def op_handles(items: list[str]) -> dict:
    """The handles of ``--op-handle`` items (see :func:`dynexit.costs.resolve_handles`)."""
    from dynexit.costs import resolve_handles

    named = {}
    for item in items:
        op, sep, handle = item.partition("=")
        if not sep or not op or not handle:
            raise ValueError(f"--op-handle {item!r}: expected OP=zero or OP=package.module:function")
        named[op] = handle
    return resolve_handles(named)


def model_arguments(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The overrides of the preset given by --set, --input-size and --num-classes."""
    overrides = model_set(args.set, command)
    for key, value in (("input_size", args.input_size), ("num_classes", args.num_classes)):
        if value is not None:
            overrides[key] = value
    return overrides


def build_model(args: argparse.Namespace, command: str):
    """The model of NAME with the overrides of :func:`model_arguments`."""
    from dynexit.models import create_model

    return create_model(args.name, **model_arguments(args, command))


# ------------------------------------------------------------------------------------ saved logits

def add_logits_inputs(parser: argparse.ArgumentParser) -> None:
    """--calib, --test, --costs and --exit-names: saved per-exit logits and the costs of the exits."""
    parser.add_argument("--calib", required=True, metavar="CALIB.npz", help="calibration logits (dynexit .npz)")
    parser.add_argument("--test", required=True, metavar="TEST.npz", help="test logits (dynexit .npz)")
    parser.add_argument("--costs", required=True, metavar="COSTS", help="per-exit costs: a,b,c,... or costs.csv")
    parser.add_argument("--exit-names", metavar="A,B,...", help="exit names for the column names "
                        "(default: the costs CSV's 'exit' column, else 0, 1, ...)")


def read_costs(spec: str):
    """Per-exit costs and (from a CSV's ``exit`` column) exit names, from ``--costs``; the costs must
    increase strictly from exit to exit."""
    import numpy as np
    import pandas as pd

    from dynexit.policies import check_costs
    from dynexit.utils import read_csv_file

    path = Path(spec)
    if path.suffix.lower() == ".csv" or path.exists():
        table = read_csv_file(path, "costs file")
        if "gmacs" not in table.columns:
            raise ValueError(f"{path} has no 'gmacs' column (columns: {', '.join(map(str, table.columns))})")
        costs = pd.to_numeric(table["gmacs"], errors="coerce").to_numpy(dtype=float)
        if np.isnan(costs).any():
            raise ValueError(f"{path}: the 'gmacs' column holds empty or non-numeric values")
        names = [str(n) for n in table["exit"]] if "exit" in table.columns else None
        return check_costs(costs, names, where=f"costs file {path}"), names
    try:
        costs = np.array([float(v) for v in spec.split(",")])
    except ValueError:
        raise ValueError(f"--costs {spec!r} is neither a CSV file nor a comma-separated list of numbers") from None
    return check_costs(costs, where=f"--costs {spec}"), None


def read_inputs(args: argparse.Namespace):
    """The logits, costs and exit names of ``--calib``, ``--test``, ``--costs`` and ``--exit-names``, checked
    against each other: ``(calib_logits, calib_targets, test_logits, test_targets, costs, names)``."""
    from dynexit.logits import load_logits

    costs, names = read_costs(args.costs)
    if args.exit_names:
        names = [n.strip() for n in args.exit_names.split(",")]
    calib_logits, calib_targets = load_logits(args.calib)
    test_logits, test_targets = load_logits(args.test)
    num_exits = calib_logits.shape[0]
    if len(costs) != num_exits:
        raise ValueError(f"--costs has {len(costs)} values but {args.calib} has {num_exits} exits")
    if names is not None and len(names) != num_exits:
        raise ValueError(f"{len(names)} exit names ({', '.join(names)}) for {num_exits} exits")
    return calib_logits, calib_targets, test_logits, test_targets, costs, names


# ---------------------------------------------------------------------------------- exit policies

def add_criterion(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--criterion", choices=CRITERIA, default=CRITERIA[0],
                        help=f"confidence criterion (default: {CRITERIA[0]})")


def add_temperature(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", action="store_true",
                        help="scale each exit's logits by a temperature fitted on the calibration split")


def add_grid(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", choices=GRIDS, default=DEFAULT_GRID,
                        help="target exit shares of the budgeted protocol: full spans every budget from the "
                             "first exit to the last; official and msdnet are the papers' grids "
                             f"(default: {DEFAULT_GRID})")


# ------------------------------------------------------------------------------- devices, outputs

def one_device(value: str) -> str:
    if "," in value:
        raise argparse.ArgumentTypeError(f"this command computes on one device, got {value!r}")
    return value


def add_device(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--devices`` for a command that computes on one device (``args.device``; ``--device`` is its old
    spelling)."""
    shown = default or "CUDA when available, else the CPU"
    parser.add_argument("--devices", dest="device", default=default, type=one_device, metavar="DEVICE",
                        help=f"the device to compute on: cpu, cuda, cuda:1, ... (default: {shown})")
    add_hidden_alias(parser, "--device", "device", type=one_device)


def add_out(parser: argparse.ArgumentParser, metavar: str, text: str, required: bool = False,
            kind: Any = str, old: tuple[str, ...] = ()) -> None:
    """--out: where a command writes (a file or a folder, as ``metavar`` and ``text`` say); ``old``: earlier
    spellings, kept as hidden aliases."""
    parser.add_argument("--out", required=required, metavar=metavar, type=kind, help=text)
    for option in old:
        add_hidden_alias(parser, option, "out", type=kind)
