"""Small helpers shared across the package."""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` and renames the temporary file onto ``path``: readers never see a
    half-written file and a failure leaves the old file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
