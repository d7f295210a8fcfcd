"""Renames run folders named by the old run id to the current one (``dynexit migrate-ids``).

The old id hashed a run's whole configuration, ``eval`` section included, before ``train.threads``
existed (a CPU worker then took ``cpu_count // workers`` threads). The current id (``dynexit.runs.spec.run_id``)
hashes what determines the trained weights: model, data, train (threads included) and seed.

For each folder under ``<results_dir>/runs/``: its ``config.yaml`` (the resolved configuration it was
trained with) gets ``train.threads`` at the value the run used, read from its ``status.json`` (the runner
recorded it) or else given by the caller; the current id is computed from that; the folder is renamed,
its ``config.yaml`` rewritten with the threads, and its ``eval.json`` written from the config's ``eval``
section (the old id covered that section, so the folder's outputs were computed with exactly those
settings). Then the experiment's ``index.csv``, ``runs.csv`` and ``curves.csv`` are rebuilt from the run
folders (``dynexit.runs.aggregate``), and the old ids are replaced by the new ones in the other CSV files of the
results folder (report tables, search trials) and in the run folders' ``train_result.json``.

Everything is checked before anything is renamed. A checkpoint in a renamed folder keeps its stored
configuration (without ``train.threads``), so the training loop would refuse to resume it; a finished
run is never resumed (a change of eval settings re-evaluates it without training).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


@dataclass
class Rename:
    old_id: str
    new_id: str
    threads: int
    in_spec: bool  # the new id is a run of the spec


def plan_migration(spec_path: str | Path, results_dir: str | Path | None = None,
                   threads: int | None = None) -> list[Rename]:
    """The renames that ``migrate_run_ids`` would make (folders already named by their current id are
    left out). Raises ValueError naming the folder when a run's threads are unknown or conflicting, or
    when a new name is taken."""
    from dynexit.config import load_run_config
    from dynexit.runs.folders import read_status
    from dynexit.runs.spec import load_spec, run_id

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    experiment = load_spec(spec_path, results_dir=results_dir)
    runs_dir = experiment.results_dir / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"no run folders to migrate: {runs_dir} does not exist")
    spec_ids = {r.run_id for r in experiment.runs}
    plan: list[Rename] = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        config_path = folder / "config.yaml"
        try:
            if not config_path.is_file():
                raise ValueError(f"{folder} has no config.yaml")
            raw = yaml.safe_load(config_path.read_text()) or {}
            cfg = load_run_config(config_path, import_factories=False)
        except (ValueError, TypeError, OSError, yaml.YAMLError) as err:  # reported; the other folders go on
            log.warning("%s left as it is: its configuration cannot be read, so its current run id is not "
                        "known (%s)", folder, str(err).splitlines()[0])
            continue
        if "threads" not in (raw.get("train") or {}):
            recorded = read_status(folder).get("threads")
            if recorded is not None and threads is not None and int(recorded) != threads:
                raise ValueError(f"{folder / 'status.json'} records {recorded} threads, but --threads {threads} "
                                 f"was given; leave --threads out to use the recorded value")
            if recorded is None and threads is None:
                raise ValueError(f"{folder}: neither its status.json nor --threads says how many CPU threads the "
                                 f"run used; pass --threads N")
            cfg.train.threads = int(recorded if recorded is not None else threads)
        new_id = run_id(cfg)
        if new_id == folder.name:
            continue
        if (runs_dir / new_id).exists():
            raise ValueError(f"cannot rename {folder} to {new_id}: {runs_dir / new_id} exists")
        plan.append(Rename(folder.name, new_id, cfg.train.threads, new_id in spec_ids))
    if len({r.new_id for r in plan}) != len(plan):
        raise ValueError(f"two run folders in {runs_dir} map to the same run id (they differ only in eval "
                         f"settings); keep one of them")
    return plan


def migrate_run_ids(spec_path: str | Path, results_dir: str | Path | None = None,
                    threads: int | None = None) -> list[Rename]:
    """Renames the run folders of the spec's results folder (or ``results_dir``) to their current run ids
    and rewrites the experiment's files to match (see the module docstring); returns the renames."""
    from dynexit.config import load_run_config, save_yaml
    from dynexit.runs.aggregate import aggregate, write_experiment_files
    from dynexit.runs.folders import EVAL_FILE, evaluation_record
    from dynexit.runs.spec import load_spec
    from dynexit.utils import atomic_write_text

    plan = plan_migration(spec_path, results_dir, threads)
    experiment = load_spec(spec_path, results_dir=results_dir)
    runs_dir = experiment.results_dir / "runs"
    for rename in plan:
        old, new = runs_dir / rename.old_id, runs_dir / rename.new_id
        cfg = load_run_config(old / "config.yaml", import_factories=False)
        cfg.train.threads = rename.threads
        if not (old / EVAL_FILE).is_file():
            atomic_write_text(old / EVAL_FILE, _json(evaluation_record(cfg.eval)))
        save_yaml(cfg, old / "config.yaml")
        old.rename(new)
        _relink_tensorboard(experiment.results_dir, old, new)
        log.info("%s -> %s (train.threads=%d)%s", rename.old_id, rename.new_id, rename.threads,
                 "" if rename.in_spec else "; not a run of the spec")
    if not plan:
        log.info("%s: every run folder already has its current id", runs_dir)
        return plan
    mapping = {r.old_id: r.new_id for r in plan}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    rebuilt = {experiment.results_dir / name for name in ("index.csv", "runs.csv", "curves.csv")}
    others = [p for p in experiment.results_dir.rglob("*.csv") if p not in rebuilt and runs_dir not in p.parents]
    others += [runs_dir / r.new_id / "train_result.json" for r in plan]
    for path in others:
        if path.is_file():
            text = path.read_text()
            replaced = pattern.sub(lambda m: mapping[m.group(1)], text)
            if replaced != text:
                atomic_write_text(path, replaced)
    write_experiment_files(experiment)
    aggregate(experiment)
    return plan


def _relink_tensorboard(results_dir: Path, old: Path, new: Path) -> None:
    """Points the experiment's TensorBoard links (``<results_dir>/tb/*``) to a renamed run folder."""
    import os

    from dynexit.runs.execute import TB_LINKS

    links = results_dir / TB_LINKS
    for link in links.iterdir() if links.is_dir() else []:
        if link.is_symlink() and (links / os.readlink(link)).resolve() == (old / "tb").resolve():
            tmp = links / f".{link.name}.{os.getpid()}.tmp"
            os.symlink(os.path.relpath(new / "tb", links), tmp, target_is_directory=True)
            os.replace(tmp, link)


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2)
