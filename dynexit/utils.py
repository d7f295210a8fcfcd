"""Small helpers shared across the package.

Results are written atomically: into a temporary file next to the target, then renamed onto it. A
temporary's name records its writer (``.NAME.<host>-<pid>.<random>.tmp``, host as a short hash), so that
the temporaries of a writer that was killed mid-write can be told apart from those of a live one and
swept: each process sweeps a folder the first time it writes into it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# The host matters on a shared file system: a pid says nothing about a process of another machine.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[0-9a-f]+\.tmp$")
_swept: set[str] = set()  # folders this process has swept already


def temporary_name(name: str) -> str:
    """A hidden name, unique to this call, for a temporary of ``name`` written by this process."""
    return f".{name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"


def sweep_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes the temporaries (files, staging folders) in ``folder`` whose writer, a process of this host,
    is no longer alive; returns them. Temporaries of live writers and of other hosts stay."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another process swept it first
            continue
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _sweep_once(folder: Path) -> None:
    key = str(folder.resolve())
    if key not in _swept:
        sweep_stale_temporaries(folder)
        _swept.add(key)


def _create_temporary(folder: Path, name: str) -> Path:
    while True:
        tmp = folder / temporary_name(name)
        try:  # mode 0666 less the umask: what a plain open() gives (mkstemp would give 0600)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` and renames the temporary file onto ``path``: readers never see a
    half-written file and a failure leaves the old file untouched. The file gets the mode a plain
    ``open()`` would give it under the current umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = _create_temporary(path.parent, path.name)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """All or nothing for a set of files: yields an empty staging folder; when the block completes, every
    file written into it is moved into ``out_dir`` (each atomically, replacing a file of the same name);
    when it raises, ``out_dir`` stays as it was. The staging folder lies in ``out_dir``'s nearest existing
    ancestor (the same file system; a failure creates no folder) and is removed either way."""
    out = Path(out_dir).resolve()  # out_dir a link to another file system: stage on that one
    base = next((p for p in out.parents if p.is_dir()), out)
    for folder in (base, out):
        _sweep_once(folder)
    stage = base / temporary_name(out.name)
    stage.mkdir()
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(stage.iterdir()):
            if not file.is_file():
                raise ValueError(f"staged {file.name} is not a file; only files can be moved into {out}")
        for file in sorted(stage.iterdir()):
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json_file(path: str | Path, what: str) -> Any:
    """A JSON file's contents; a missing, unreadable or malformed file is an error naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None


def read_csv_file(path: str | Path, what: str):
    """A CSV file as a DataFrame (empty when the file is); errors name ``what`` and the path."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"cannot read {what} {path}: {str(err).strip()}") from None


class UnsafeFileError(ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses: unpickling it would construct objects of
    ``globals_`` (classes or functions outside the allow-list), which could run code. ``path``: the file."""

    def __init__(self, message: str, path: Path, globals_: list[str]):
        super().__init__(message)
        self.path, self.globals = path, globals_


def load_torch_file(path: str | Path, what: str, allow: Sequence[Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` onto the CPU. ``allow``: the classes a format needs
    beyond tensors and plain containers (e.g. ``argparse.Namespace`` for official checkpoints), allowed
    for this one load only. A missing or unreadable file is an error naming ``what`` and the path; a file
    that needs anything else is refused (:class:`UnsafeFileError`, naming what it holds) and nothing in it
    runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path, allow, err)
        refusal = _WEIGHTS_ONLY_REFUSAL.search(str(err))
        if not names and refusal is None:  # a damaged pickle, not a refused one
            raise ValueError(f"cannot read {what} {path}: {_first_line(err)}") from None
        holds = ", ".join(names) if names else refusal.group(1).strip()
        raise UnsafeFileError(
            f"refusing to load {what} {path}: it holds {holds}, which a {what} may not contain (unpickling it "
            f"could run code); nothing in it was run. Use only files from sources you trust",
            path, names) from None
    except Exception as err:
        raise ValueError(f"cannot read {what} {path}: {_first_line(err)}") from None


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_WEIGHTS_ONLY_REFUSAL = re.compile(r"WeightsUnpickler error: ([^\n]+)")


def _unsafe_globals(path: Path, allow: Sequence[Any], err: Exception) -> list[str]:
    """Every global ``path`` needs beyond the allow-list, read statically from the pickle (nothing is
    constructed); falls back on the one torch's error names."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch's message still names the first one
        names = []
    return names or _REFUSED_GLOBAL.findall(str(err))[:1]


def _first_line(err: Exception) -> str:
    """The first sentence of an error (torch's go on for several lines of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def flatten_dict(tree: dict, prefix: str = "") -> dict:
    """``{"model": {"name": "x"}}`` -> ``{"model.name": "x"}`` (for CSV columns and TensorBoard HParams)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, name + "."))
        else:
            out[name] = value
    return out


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block, its own mode (training or not) restored after, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
