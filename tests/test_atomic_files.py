"""Atomic writes: the mode a plain open() gives, temporaries of killed writers swept on the next write,
and staged folders that change all their files or none."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dynexit import utils
from dynexit.utils import atomic_write, atomic_write_text, staged_folder, sweep_stale_temporaries, temporary_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    """Sets the process umask for a test and restores it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_of_a_plain_open(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_text(tmp_path / "result.csv", "a,b\n")
    with open(tmp_path / "plain.csv", "w") as fh:
        fh.write("a,b\n")
    assert (tmp_path / "result.csv").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain.csv").stat().st_mode & 0o777 == mode
    with staged_folder(tmp_path / "report") as stage:  # a report's files too
        atomic_write_text(stage / "table.md", "| a |\n")
    assert (tmp_path / "report" / "table.md").stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.csv", "report", "result.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", fail)
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_temporaries_of_dead_writers_are_swept_and_others_kept(tmp_path):
    dead = temporary_name("curves.csv").replace(f"-{os.getpid()}.", f"-{_dead_pid()}.")
    mine = temporary_name("runs.csv")  # this process is alive
    other_host = "." + "runs.csv.00000000-1.0a1b2c3d.tmp"  # a writer on another machine (shared file system)
    unrelated = ".notes.tmp"
    for name in (dead, mine, other_host, unrelated):
        (tmp_path / name).write_text("partial")
    staging = tmp_path / temporary_name("report").replace(f"-{os.getpid()}.", f"-{_dead_pid()}.")
    (staging / "sub").mkdir(parents=True)
    assert sorted(p.name for p in sweep_stale_temporaries(tmp_path)) == sorted([dead, staging.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine, other_host, unrelated])
    assert sweep_stale_temporaries(tmp_path / "missing") == []


KILLED_WRITER = """
import os, sys, time
from dynexit.utils import atomic_write

def write(tmp):
    with open(tmp, "w") as fh:
        fh.write("half a file")
    print(tmp, flush=True)
    time.sleep(600)  # killed here, mid-write

atomic_write(sys.argv[1], write)
"""


def test_a_writer_killed_mid_write_leaves_a_temporary_that_the_next_write_sweeps(tmp_path):
    folder = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(folder / "runs.csv")],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        tmp = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert tmp.parent == folder and tmp.read_text() == "half a file"
    assert not (folder / "runs.csv").exists()
    utils._swept.discard(str(folder.resolve()))  # as a fresh process: the first write into the folder sweeps it
    atomic_write_text(folder / "curves.csv", "x\n")
    assert [p.name for p in folder.iterdir()] == ["curves.csv"]


def test_staged_folder_changes_all_files_or_none(tmp_path):
    out = tmp_path / "report"
    with staged_folder(out) as stage:
        for name in ("a.csv", "b.png"):
            atomic_write_text(stage / name, f"first {name}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert before == {"a.csv": b"first a.csv", "b.png": b"first b.png"}
    with pytest.raises(RuntimeError, match="midway"):
        with staged_folder(out) as stage:
            atomic_write_text(stage / "a.csv", "second")
            atomic_write_text(stage / "c.pdf", "new")
            raise RuntimeError("midway")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left
    # A report into a folder that does not exist yet: a failure creates no folder at all.
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "new" / "deeper" / "report") as stage:
            assert stage.parent == tmp_path
            raise RuntimeError("nothing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    # The next report of a new process sweeps what a killed one left in the report folder.
    (out / temporary_name("a.csv").replace(f"-{os.getpid()}.", f"-{_dead_pid()}.")).write_text("half")
    utils._swept.clear()
    with staged_folder(out) as stage:
        atomic_write_text(stage / "a.csv", "second")
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "b.png"]
    assert (out / "a.csv").read_text() == "second" and (out / "b.png").read_text() == "first b.png"
    # A report folder that links to another place is staged next to its target (the same file system).
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "link").symlink_to(tmp_path / "elsewhere")
    with staged_folder(tmp_path / "results" / "link") as stage:
        assert stage.parent == tmp_path
        atomic_write_text(stage / "a.csv", "linked")
    assert (tmp_path / "elsewhere" / "a.csv").read_text() == "linked"
