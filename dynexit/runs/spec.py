"""Experiment specs: a base run configuration and a grid of variations, expanded into runs.

A spec (YAML)::

    name: quickstart
    results_dir: results/quickstart      # default: results/<name>
    base:                                # a RunConfig: model, data, train, eval, seed
      model: {name: tiny_perceiver_t16}
      data: {name: digits}
    variants:                            # named overrides, one run group each (default: {base: {}})
      full: {}
      no_x2z: {model.x2z: false}
    grid:                                # cartesian product of dotted keys
      train.lr: [0.001, 0.003]
    zip:                                 # groups of equally long lists, varied together
      - {model.name: [a, b], train.lr: [0.001, 0.0006]}
    seeds: [0, 1]                        # default: the base seed
    reference: full                      # the report compares every variant with this one (default: the first)
    executor: {kind: local}              # local | slurm | submitit_local

Runs = variants x grid x zip groups x seeds. Every run is validated against the typed RunConfig before
anything runs: an unknown key, a wrong type or an impossible value is an error naming the file, the key
path and, where the YAML gives it, the line. A run's id is a short hash of what determines its trained
weights: its resolved configuration without the ``eval`` section.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from dynexit.config import RunConfig, merge, parse_set, to_container, validate_run_config
from dynexit.yaml_files import line_note, read_yaml


@dataclass
class ExecutorConfig:
    """Where and how the runs execute (the spec's ``executor`` section; ``--set executor.KEY=VALUE`` too).
    None of it is part of a run's identity: it changes where a run computes, not what."""

    kind: str = "local"  # local | slurm | submitit_local
    gpus_per_run: int = 1  # > 1: each run trains through torchrun on that many GPUs (all nodes together)
    nodes: int = 1  # > 1 (slurm only): each run spans that many nodes, gpus_per_run / nodes GPUs on each
    timeout_min: int = 60 * 24  # SLURM job time limit
    slurm_partition: Optional[str] = None  # SLURM partition; None: the cluster's default
    slurm_account: Optional[str] = None  # SLURM account to charge; None: the user's default
    # CPUs of each training process (one per GPU); None: data.num_workers + 1, at most 8 (dynexit.runs.slurm)
    cpus_per_gpu: Optional[int] = None
    cpus_per_task: Optional[int] = None  # CPUs of the whole task instead (exclusive with cpus_per_gpu)
    mem_gb: Optional[int] = None  # memory per node; None: 8 GB per CPU
    slurm_array_parallelism: int = 16  # runs of one submission the scheduler runs at once
    max_num_timeout: int = 3  # requeues after reaching the time limit (preemptions are not counted)
    # Any other sbatch option, as key: value (``true`` for a bare flag), e.g. {qos: high, constraint: a100}
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines the job runs first (module load, conda activate)


EXECUTORS = ("local", "slurm", "submitit_local")
# sbatch options dynexit writes itself: given through ``executor.sbatch`` they would contradict its fields.
SBATCH_OWN = {"job_name": "the job name", "time": "executor.timeout_min", "partition": "executor.slurm_partition",
              "account": "executor.slurm_account", "cpus_per_task": "executor.cpus_per_gpu or cpus_per_task",
              "mem": "executor.mem_gb", "nodes": "executor.nodes", "ntasks_per_node": "executor.nodes",
              "gpus_per_node": "executor.gpus_per_run", "array": "executor.slurm_array_parallelism",
              "output": "submitit's log files", "error": "submitit's log files", "signal": "submitit's requeue",
              "open_mode": "submitit's log files"}


def validate_executor(ex: ExecutorConfig) -> None:
    """Raises ValueError naming the first impossible ``executor.<key>`` (its value, the kind, the GPUs and nodes
    against each other)."""
    bad = ValueError

    if ex.kind not in EXECUTORS:
        raise bad(f"executor.kind must be {', '.join(EXECUTORS)}, not {ex.kind!r}")
    for key, low in (("gpus_per_run", 0), ("nodes", 1), ("timeout_min", 1), ("slurm_array_parallelism", 1),
                     ("max_num_timeout", 0)):
        value = getattr(ex, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(f"executor.{key} must be an integer >= {low}, got {value!r}")
    for key in ("cpus_per_gpu", "cpus_per_task", "mem_gb"):
        value = getattr(ex, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad(f"executor.{key} must be a positive integer or null (derived), got {value!r}")
    if ex.cpus_per_gpu is not None and ex.cpus_per_task is not None:
        raise bad("executor.cpus_per_gpu and executor.cpus_per_task exclude each other: give one")
    for key in ("slurm_partition", "slurm_account"):
        value = getattr(ex, key)
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise bad(f"executor.{key} must be a name without spaces, got {value!r}")
    for key, value in ex.sbatch.items():
        option = str(key).replace("-", "_")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", option):
            raise bad(f"executor.sbatch.{key}: not an sbatch option name (e.g. qos, constraint, gres)")
        if option in SBATCH_OWN:
            raise bad(f"executor.sbatch.{key}: dynexit sets --{option.replace('_', '-')} itself; use "
                      f"{SBATCH_OWN[option]}")
        if value is False or value is None or not isinstance(value, (str, int, float)) or (
                isinstance(value, str) and (not value or "\n" in value)):
            raise bad(f"executor.sbatch.{key} must be a value on one line (or true for a bare flag), got {value!r}")
    for i, line in enumerate(ex.setup):
        if not isinstance(line, str) or "\n" in line:
            raise bad(f"executor.setup[{i}] must be one shell line, got {line!r}")
    if ex.nodes > 1:
        if ex.kind != "slurm":
            raise bad(f"executor.nodes={ex.nodes} needs executor.kind: slurm ({ex.kind} runs use one machine)")
        if ex.gpus_per_run < 1:
            raise bad(f"executor.nodes={ex.nodes} needs GPUs: executor.gpus_per_run is {ex.gpus_per_run}; set it to "
                      f"the run's GPUs on all nodes together, a multiple of {ex.nodes}")
        if ex.gpus_per_run % ex.nodes:
            raise bad(f"executor.gpus_per_run={ex.gpus_per_run} cannot be split evenly over executor.nodes="
                      f"{ex.nodes}: gpus_per_run counts the GPUs of all nodes together, a multiple of nodes")


@dataclass
class SpecFile:
    """The schema of a spec file (``base`` is checked separately, run by run)."""

    name: str = "experiment"
    description: str = ""
    results_dir: Optional[str] = None
    base: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    reference: Optional[str] = None  # the variant the report's deltas and verdicts are taken against


@dataclass
class Run:
    run_id: str
    variant: str
    overrides: dict[str, Any]  # the dotted keys this run sets (variant, grid, zip, seed)
    config: RunConfig


@dataclass
class Experiment:
    name: str
    path: Optional[Path]
    results_dir: Path
    executor: ExecutorConfig
    runs: list[Run]
    grid_keys: list[str]  # the dotted keys that vary (columns of runs.csv)
    raw: dict[str, Any]

    def run(self, run_id: str) -> Run:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise KeyError(f"no run {run_id} in experiment {self.name}")


# The sections of a run configuration that determine its trained weights: a run's identity. The ``eval``
# section is left out: changing how a finished run is evaluated re-evaluates it, it does not retrain it.
IDENTITY_SECTIONS = ("model", "data", "train", "seed")
# Train fields added after results were committed under ids without them: part of the identity only when
# set to something other than their default.
IDENTITY_IF_SET = {"reference_batch": None, "scale_lr": False, "compile": False, "eval_calib": "every"}
# Settings that change how fast a run computes, never its numbers, so never its identity: hashed at one fixed
# value (the value the committed results were hashed with, so that their ids stay valid), or left out.
SPEED_SETTINGS = {"data": {"num_workers": 0}, "train": {}}
SPEED_SETTINGS_LEFT_OUT = {"data": ("stage_to",), "train": ("checkpoint_minutes", "dist_timeout_min")}


def run_id(cfg: RunConfig) -> str:
    """A short, stable hash of what determines a run's trained weights: its resolved configuration
    without the ``eval`` section (``IDENTITY_SECTIONS``) and without the settings of speed alone
    (``SPEED_SETTINGS``: loader workers, staging, checkpoint interval, process-group timeout)."""
    tree = to_container(cfg)
    identity = {key: tree[key] for key in IDENTITY_SECTIONS}
    for key, default in IDENTITY_IF_SET.items():  # left out at their default: earlier ids stay valid
        if identity["train"].get(key, default) == default:
            identity["train"].pop(key, None)
    for section, fixed in SPEED_SETTINGS.items():
        identity[section].update(fixed)
    for section, keys in SPEED_SETTINGS_LEFT_OUT.items():
        for key in keys:
            identity[section].pop(key, None)
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def load_spec(path: str | Path, overrides: list[str] | None = None,
              results_dir: str | Path | None = None, import_factories: bool = True) -> Experiment:
    """Reads, validates and expands a spec file; ``overrides`` (``key=value``) apply to every run;
    ``results_dir`` replaces the spec's own. A spec the user passes is their own code: its factories are
    imported to check their models. ``import_factories=False`` for a spec read from a results folder
    (``experiment.yaml``): data, whose factories are never imported."""
    path = Path(path)
    raw = read_yaml(path, "spec file")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a spec is a mapping with at least 'name' and 'base'")
    experiment = expand(raw, path, overrides, import_factories)
    if results_dir is not None:
        experiment.results_dir = Path(results_dir)
    return experiment


def reload_spec(raw: dict[str, Any], path: str | Path | None, overrides: list[str] | None,
                results_dir: str | Path) -> Experiment:
    """The experiment of a spec as read earlier (``raw``, its mapping, e.g. an ``Experiment.raw``): what a
    worker process or a SLURM job runs, whatever the spec file says by now."""
    experiment = expand(copy.deepcopy(raw), Path(path) if path is not None else None, overrides)
    experiment.results_dir = Path(results_dir)
    return experiment


def expand(raw: dict[str, Any], path: Path | None = None, overrides: list[str] | None = None,
           import_factories: bool = True) -> Experiment:
    where = str(path) if path else "spec"
    spec: SpecFile = merge(SpecFile, check_sections(raw, where), where=where)
    check_names(spec, where)
    if spec.reference is not None and spec.reference not in (spec.variants or {"base": {}}):
        raise ValueError(f"{where}: reference {spec.reference!r} is not one of the variants "
                         f"({', '.join(spec.variants or {'base': {}})})")
    check_keys_given_once(spec, overrides or [], where)
    cli = to_plain(parse_set(overrides)) if overrides else {}
    cli_executor: dict[str, Any] = {}
    if "executor" in cli:  # --set executor.KEY=VALUE: the spec's executor section, not the runs' configuration
        cli_executor = cli.pop("executor")
        if not isinstance(cli_executor, dict):
            raise ValueError("--set executor=...: give one key at a time, e.g. --set executor.kind=slurm")
        spec = merge(spec, {"executor": cli_executor}, where="--set")
    try:
        validate_executor(spec.executor)
    except ValueError as err:
        key = re.match(r"executor\.(\w+)", str(err))
        given = key is not None and key.group(1) in cli_executor
        raise ValueError(f"{'--set' if given else where}: {err}{'' if given else line_note(path, str(err))}") from None
    variants = spec.variants or {"base": {}}
    axes: list[list[dict[str, Any]]] = [[{k: v} for v in _values(spec.grid[k], k, where)] for k in spec.grid]
    for g, group in enumerate(spec.zip):
        lengths = {k: len(_values(v, k, where)) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{where}: zip group {g} has lists of different lengths: {lengths}")
        n = next(iter(lengths.values()), 0)
        axes.append([{k: group[k][i] for k in group} for i in range(n)])
    seeds = spec.seeds or [None]
    grid_keys = sorted({k for v in variants.values() for k in v} | set(spec.grid)
                       | {k for group in spec.zip for k in group} | ({"seed"} if spec.seeds else set()))

    runs: list[Run] = []
    seen: dict[str, str] = {}
    for variant, variant_overrides in variants.items():
        for combo in itertools.product(*axes):
            for seed in seeds:
                dotted = dict(variant_overrides or {})
                for part in combo:
                    dotted.update(part)
                if seed is not None:
                    dotted["seed"] = seed
                label = f"{where}: variant {variant!r}" + (f" with {dotted}" if dotted else "")
                cfg = build_run_config(spec.base, dotted, cli, label, path, import_factories)
                rid = run_id(cfg)
                if rid in seen:
                    raise ValueError(f"{where}: runs {seen[rid]} and {label} have the same configuration, "
                                     f"apart from the eval section at most (not part of a run's identity: a "
                                     f"run is trained once and its folder holds one evaluation)")
                seen[rid] = label
                runs.append(Run(rid, variant, dotted, cfg))
    results_dir = Path(spec.results_dir) if spec.results_dir else Path("results") / spec.name
    return Experiment(spec.name, path, results_dir, spec.executor, runs, grid_keys, raw)


# Each top-level section of a spec: is its value of the right kind, and how to say what it must be.
_SECTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string (the experiment's name)"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "results_dir": (lambda v: v is None or isinstance(v, str), "a folder path (string)"),
    "base": (lambda v: v is None or isinstance(v, dict),
             "a mapping: a run configuration (model, data, train, eval, seed)"),
    "variants": (lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and (o is None or isinstance(o, dict)) for k, o in v.items())),
        "a mapping of variant name -> overrides (a mapping of dotted keys to values, {} for none), e.g. "
        "{full: {}, no_x2z: {model.x2z: false}}"),
    "grid": (lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)),
             "a mapping of dotted key -> list of values, e.g. {train.lr: [0.001, 0.003]}"),
    "zip": (lambda v: v is None or (isinstance(v, list) and all(isinstance(g, dict) for g in v)),
            "a list of groups, each a mapping of dotted key -> list of values of one length, e.g. "
            "[{model.name: [a, b], train.lr: [0.001, 0.0006]}]"),
    "seeds": (lambda v: v is None or (isinstance(v, list) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in v)), "a list of integers, e.g. [0, 1, 2]"),
    "reference": (lambda v: v is None or isinstance(v, str), "a variant's name (the report's reference)"),
    "executor": (lambda v: v is None or isinstance(v, dict),
                 "a mapping, e.g. {kind: local} or {kind: slurm, slurm_partition: gpu}"),
}


def check_sections(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw`` with empty sections left out (their defaults apply) and empty variants as ``{}``, after
    checking that every top-level section is known and of the right kind (else a ValueError naming it)."""
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise ValueError(f"{where}: unknown section {key!r}; a spec has {', '.join(_SECTIONS)}")
        valid, expected = _SECTIONS[key]
        if not valid(value):
            raise ValueError(f"{where}: '{key}' must be {expected}; got {_describe_value(value)}")
    out = {key: value for key, value in raw.items() if value is not None}
    if "variants" in out:
        out["variants"] = {name: overrides or {} for name, overrides in out["variants"].items()}
    return out


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one file or folder name (None when it can)."""
    if not name.strip():
        return "it is blank"
    if name in (".", ".."):
        return "it names a folder's parent or itself"
    bad = sorted({c for c in name if c in "/\\" or ord(c) < 32})
    if bad:
        return f"it holds {', '.join(repr(c) for c in bad)}"
    if len(name.encode()) > 200:
        return "it is longer than 200 bytes"
    return None


def check_names(spec: SpecFile, where: str) -> None:
    """The experiment's and the variants' names become folder and file names: each must be one."""
    problem = file_name_problem(spec.name)
    if problem:
        raise ValueError(f"{where}: name {spec.name!r} cannot name the results folder: {problem}")
    for variant in spec.variants:
        problem = file_name_problem(variant.replace("/", "-"))  # a '/' becomes '-' in file names
        if problem:
            raise ValueError(f"{where}: variant name {variant!r} cannot be part of a file name: {problem}")


def dotted_leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys that ``tree`` sets, written nested or dotted alike (``{a: {b: 1}}`` and ``{a.b: 1}``)."""
    leaves = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        leaves += dotted_leaves(value, f"{path}.") if isinstance(value, dict) and value else [path]
    return leaves


def _clash(keys: list[str]) -> tuple[str, str] | None:
    """Two keys that set the same value (equal, or one inside the other), if any."""
    ordered = sorted(keys)
    for a, b in zip(ordered, ordered[1:]):
        if a == b or b.startswith(a + "."):
            return a, b
    return None


def check_keys_given_once(spec: SpecFile, overrides: list[str], where: str) -> None:
    """ValueError naming a key given twice in any form: within a variant or ``--set`` (dotted and nested), or
    by two of variant, grid, zip groups and seeds, where one would silently win over the other."""
    for variant, tree in spec.variants.items():
        clash = _clash(dotted_leaves(tree or {}))
        if clash:
            raise ValueError(f"{where}: variant {variant!r} sets {clash[0]!r} twice ({' and '.join(clash)}); "
                             f"give each key once")
    if overrides:
        clash = _clash([key for item in overrides for key in dotted_leaves(to_plain(parse_set([item])))])
        if clash:
            raise ValueError(f"--set gives {clash[0]!r} twice ({' and '.join(clash)}); give each key once")
    sources = {"grid": list(spec.grid), **{f"zip group {g}": list(group) for g, group in enumerate(spec.zip)}}
    if spec.seeds:
        sources["seeds"] = ["seed"]
    for variant, tree in spec.variants.items():
        sources[f"variant {variant!r}"] = dotted_leaves(tree or {})
    names = list(sources)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if first.startswith("variant") and second.startswith("variant"):
                continue  # variants are alternatives, not layers
            clash = _clash(sources[first] + sources[second])
            if clash and not (_clash(sources[first]) or _clash(sources[second])):
                raise ValueError(f"{where}: {first} and {second} both set {clash[0]!r}; set it in one place")


def _describe_value(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(value))
    kind = kind or ("nothing" if value is None else type(value).__name__)
    text = json.dumps(value, default=str)
    return f"{kind} {text if len(text) <= 80 else text[:77] + '...'}"


def build_run_config(base: dict, dotted: dict[str, Any], cli: dict, label: str, path: Path | None,
                     import_factories: bool = True) -> RunConfig:
    """base + dotted overrides + command-line overrides, validated; errors name the key (and line)."""
    try:
        cfg = merge(RunConfig, base, where="base")
        cfg = merge(cfg, OmegaConf.from_dotlist([f"{k}={_yaml(v)}" for k, v in dotted.items()]), where="grid")
        if cli:
            cfg = merge(cfg, cli, where="--set")
        validate_run_config(cfg, import_factories)
    except (ValueError, TypeError) as err:
        from dynexit.yaml_files import key_in_message

        key = key_in_message(str(err))
        if cli and key is not None and any(key == k or key.startswith(k + ".") for k in dotted_leaves(cli)):
            raise ValueError(f"{label}: --set: {err}") from None  # the option's value, not the spec's line
        line = line_note(path, str(err))
        raise ValueError(f"{label}: {err}{line}") from None
    return cfg


def to_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _values(values: Any, key: str, where: str) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: grid key {key!r} needs a non-empty list of values, got {values!r}")
    return values


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
