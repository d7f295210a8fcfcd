"""``data.stage_to``: a data set's files copied once to a node's local disk and read from there.

Network file systems serve many small files slowly to many loader workers; a node-local disk (``$TMPDIR``,
``$SLURM_TMPDIR``, ``/scratch``) serves them fast. The first process of a node that asks copies ``data.root``
there, under a lock, into a folder named after the source; the others (the node's other ranks, later runs)
wait for it and reuse the copy. A copy is complete when its marker is written, last; an interrupted copy is
made again. To stage a changed source again, delete the staged folder.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".dynexit-staged.json"


def staging_folder(target: str) -> Path:
    """``data.stage_to`` with ``~`` and environment variables expanded (``$SLURM_TMPDIR/data``); a variable
    that is not set is a ValueError naming the key (the folder would be a literal ``$...`` otherwise)."""
    expanded = os.path.expanduser(os.path.expandvars(target))
    if "$" in expanded:
        raise ValueError(f"data.stage_to={target!r}: an environment variable in it is not set here")
    return Path(expanded)


def stage(root: str | Path, target: str) -> Path:
    """The staged copy of the folder ``root`` under ``target`` (``data.stage_to``), made now if this node has
    none: ``<target>/<root's name>-<hash of root's path>``."""
    source = Path(root).expanduser().resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"data.stage_to: data.root {source} is not a folder to stage")
    base = staging_folder(target)
    base.mkdir(parents=True, exist_ok=True)
    dest = base / f"{source.name}-{hashlib.sha1(str(source).encode()).hexdigest()[:8]}"
    with open(base / f".{dest.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other processes wait for the copy
        if _complete(dest, source):
            log.info("data.stage_to: using the copy of %s in %s", source, dest)
            return dest
        if dest.exists():
            log.warning("data.stage_to: %s is incomplete (an interrupted copy); copying %s again", dest, source)
            shutil.rmtree(dest)
        start = time.perf_counter()
        partial = base / f".{dest.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        partial.rename(dest)
        files = sum(len(names) for _, _, names in os.walk(dest))
        (dest / MARKER).write_text(json.dumps({"source": str(source), "files": files,
                                               "staged": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        log.info("data.stage_to: copied %s (%d files) to %s in %.0f s", source, files, dest,
                 time.perf_counter() - start)
    return dest


def _complete(dest: Path, source: Path) -> bool:
    try:
        return json.loads((dest / MARKER).read_text()).get("source") == str(source)
    except (OSError, ValueError, AttributeError):
        return False
