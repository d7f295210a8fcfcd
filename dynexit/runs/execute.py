"""One run executed in this process, under its folder's lock, its state recorded in the folder (used by
the local runner and by SLURM jobs alike)."""
from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynexit.runs.folders import (
    DONE,
    FAILED,
    RUNNING,
    evaluation_changes,
    read_status,
    run_dir,
    run_lock,
    write_status,
)
from dynexit.runs.spec import Experiment, Run
from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    run_id: str
    state: str
    error: str = ""


def execute(experiment: Experiment, run: Run, devices: list[str],
            trains: Callable[[bool], None] | None = None) -> Outcome:
    """Executes one run in this process (skipping it if it is done or another process runs it); a done
    run whose eval settings changed is evaluated again, without training.

    ``trains``, if given, hears once whether this process trains the run (True, just before it does) or
    not (False): the other processes of a multi-node run train with it or return (``dynexit.runs.slurm``)."""
    from dynexit.runs.pipeline import run_pipeline

    folder = run_dir(experiment, run)
    trains = trains or (lambda _: None)
    with run_lock(folder) as acquired:
        if not acquired:
            trains(False)
            return Outcome(run.run_id, RUNNING)
        if read_status(folder).get("state") == DONE:
            trains(False)
            return _reevaluate(run, folder, devices[0])
        write_status(folder, RUNNING, pid=os.getpid(), devices=devices, threads=run.config.train.threads,
                     variant=run.variant, overrides=run.overrides, error="")
        trains(True)
        log.info("run %s (%s %s) on %s", run.run_id, run.variant, run.overrides or "", ",".join(devices))
        try:
            name = tensorboard_name(experiment, run)
            if run.config.train.tensorboard:
                link_tensorboard(experiment, folder, name)
            run_pipeline(run.config, folder, devices, name=f"{experiment.name}/{name}")
        except Exception as err:  # noqa: BLE001 - a failed run is recorded; the others go on
            message = f"{type(err).__name__}: {err}{failure_hint(err, run)}"
            text = traceback.format_exc()
            atomic_write_text(folder / "error.txt", text)
            write_status(folder, FAILED, error=message)
            log.error("run %s failed: %s\n%s\n(the whole traceback: %s)", run.run_id, message,
                      "\n".join(text.rstrip().splitlines()[-6:]), folder / "error.txt")
            return Outcome(run.run_id, FAILED, message)
        write_status(folder, DONE)
    return Outcome(run.run_id, DONE)


def _reevaluate(run: Run, folder: Path, device: str) -> Outcome:
    """A done run, evaluated again if its eval settings changed (called holding the run's lock). It stays
    done whatever happens: a failed re-evaluation is recorded as its error and tried again next time,
    never turned into training from scratch."""
    from dynexit.runs.pipeline import evaluate_run

    changes = evaluation_changes(folder, run.config.eval)
    if not changes:
        return Outcome(run.run_id, DONE)
    log.info("run %s (%s %s): evaluation settings changed (%s); evaluating it again without training",
             run.run_id, run.variant, run.overrides or "", "; ".join(changes))
    try:
        evaluate_run(run.config, folder, device)
    except Exception as err:  # noqa: BLE001 - recorded; the other runs go on
        message = f"re-evaluation failed: {type(err).__name__}: {err}"
        atomic_write_text(folder / "error.txt", traceback.format_exc())
        write_status(folder, DONE, error=message)
        log.error("run %s: %s", run.run_id, message)
        return Outcome(run.run_id, FAILED, message)
    write_status(folder, DONE, error="", reevaluated=changes)
    return Outcome(run.run_id, DONE)


def failure_hint(err: Exception, run: Run) -> str:
    """What to change when a run fails in a way a setting explains ("" otherwise)."""
    text = str(err)
    if run.config.train.channels_last and ("view size is not compatible" in text or "channels_last" in text):
        return (" (train.channels_last is on: the model's tensors are NHWC and an op of it needs contiguous NCHW "
                "ones, e.g. .view; use .reshape in the model or set train.channels_last: false)")
    return ""


TB_LINKS = "tb"  # <results_dir>/tb/<variant>_seed<k>: links to each run's event files


def tensorboard_name(experiment: Experiment, run: Run) -> str:
    """``<variant>_seed<k>_<run id>``, with the grid keys the run sets beyond its variant and seed
    (``_key=value``); the run id keeps names unique when two differ only in characters a file name cannot
    hold (``lr/hi`` and ``lr-hi``)."""
    variant_keys = set(((experiment.raw.get("variants") or {}).get(run.variant) or {}).keys())
    extra = [f"_{key}={value}" for key, value in sorted(run.overrides.items())
             if key != "seed" and key not in variant_keys]
    readable = f"{run.variant}{''.join(extra)}_seed{run.config.seed}".replace("/", "-").replace("\0", "")
    return f"{readable}_{run.run_id}"


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
