"""One run executed in this process, under its folder's lock, its state recorded in the folder (used by
the local runner and by SLURM jobs alike)."""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass

from dynexit.runs.folders import DONE, FAILED, RUNNING, read_status, run_dir, run_lock, write_status
from dynexit.runs.spec import Experiment, Run
from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    run_id: str
    state: str
    error: str = ""


def execute(experiment: Experiment, run: Run, devices: list[str]) -> Outcome:
    """Executes one run in this process (skipping it if it is done or another process runs it)."""
    from dynexit.runs.pipeline import run_pipeline

    folder = run_dir(experiment, run)
    with run_lock(folder) as acquired:
        if not acquired:
            return Outcome(run.run_id, RUNNING)
        if read_status(folder).get("state") == DONE:
            return Outcome(run.run_id, DONE)
        import torch

        write_status(folder, RUNNING, pid=os.getpid(), devices=devices, threads=torch.get_num_threads(),
                     variant=run.variant, overrides=run.overrides, error="")
        log.info("run %s (%s %s) on %s", run.run_id, run.variant, run.overrides or "", ",".join(devices))
        try:
            name = tensorboard_name(experiment, run)
            if run.config.train.tensorboard:
                link_tensorboard(experiment, folder, name)
            run_pipeline(run.config, folder, devices, name=f"{experiment.name}/{name}")
        except Exception as err:  # noqa: BLE001 - a failed run is recorded; the others go on
            message = f"{type(err).__name__}: {err}"
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            write_status(folder, FAILED, error=message)
            log.error("run %s failed: %s", run.run_id, message)
            return Outcome(run.run_id, FAILED, message)
        write_status(folder, DONE)
    return Outcome(run.run_id, DONE)


TB_LINKS = "tb"  # <results_dir>/tb/<variant>_seed<k>: links to each run's event files


def tensorboard_name(experiment: Experiment, run: Run) -> str:
    """``<variant>_seed<k>``, with the grid keys the run sets beyond its variant and seed (``_key=value``)."""
    variant_keys = set(((experiment.raw.get("variants") or {}).get(run.variant) or {}).keys())
    extra = [f"_{key}={value}" for key, value in sorted(run.overrides.items())
             if key != "seed" and key not in variant_keys]
    return f"{run.variant}{''.join(extra)}_seed{run.config.seed}".replace("/", "-")


def link_tensorboard(experiment: Experiment, folder, name: str) -> None:
    """``<results_dir>/tb/<name>`` -> the run folder's ``tb``, so that ``tensorboard --logdir
    <results_dir>/tb`` lists runs by variant and seed (TensorBoard follows links to folders)."""
    from pathlib import Path

    links = Path(experiment.results_dir) / TB_LINKS
    links.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(Path(folder) / "tb", links)
    link = links / name
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = links / f".{name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)  # atomic: a link of an earlier run of the same name is replaced
