"""Optuna studies that several worker processes share: storage, creation, and trial loops that stop at
exactly the number of finished trials asked for.

Storage: ``None`` keeps a study in memory (one process); an SQLite URL (``sqlite:///path/study.db``, the
commands' default) is a file that processes on one machine share; any other Optuna URL
(``postgresql://...``, ``mysql+pymysql://...``) serves workers on several machines. SQLite files are
put in WAL mode with ``synchronous=NORMAL``: a killed process loses nothing, readers never block the
writer, and a transaction costs about a millisecond (a power cut may lose the last ones). SQLite on a
network file system is not supported (WAL needs shared memory): use a server database there.

A study is done when it holds ``n_trials`` finished (complete or pruned) trials, however many processes
work on it; running the same command again after a kill resumes it, and a larger ``n_trials`` extends
it. Trial creation is serialised between processes by a lock (a file lock next to an SQLite file, an
advisory lock on PostgreSQL and MySQL), so workers never create more trials than asked and trial
numbers stay unique and contiguous.

:func:`run_quick_trials`, for objectives of milliseconds (threshold trials): each worker samples and
evaluates trials in a private in-memory copy of the study (same sampler and seed: one worker gives
exactly the trials of an in-memory run) and adds finished trials to the shared study, a few at a time,
one transaction each, under the lock and only while the study holds fewer than ``n_trials``; at each
visit it copies the other workers' new trials into its copy. Nothing is stored while it runs, so a
killed worker leaves nothing behind but loses the few trials it had not added.

:func:`run_trials`, for long objectives (training runs): trials live in the shared study while they run
(RUNNING, with heartbeats and intermediate values for pruners). Each trial is created WAITING, given a
heartbeat, then claimed (WAITING -> RUNNING): a worker killed at any moment leaves either a WAITING
trial, which the next worker takes over, or a RUNNING trial whose heartbeat stops; after
``grace_period`` seconds that trial is marked failed (it no longer counts) and a copy with its
parameters is queued. A worker whose own trials are done waits for the other workers' running trials,
so that when any worker returns, the study is complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

HEARTBEAT_S = 5  # seconds between heartbeats of a running trial
GRACE_S = 20  # a running trial silent for this long belongs to a dead worker
QUICK_BATCH = 8  # quick trials evaluated between two visits of the shared study
POLL_S = 0.5  # how often a worker looks at the other workers' running trials
SQLITE = "sqlite:///"
_TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_UNLOCKED: set[str] = set()  # storage kinds already warned about having no lock


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences Optuna's experimental-feature and heartbeat-usage warnings (heartbeats are used as designed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*[Hh]eartbeat.*")
        yield


def sqlite_url(path: str | Path) -> str:
    """The Optuna storage URL of the SQLite file ``path`` (made absolute)."""
    return SQLITE + str(Path(path).resolve())


def _sqlite_path(url: str) -> Optional[Path]:
    if not url.startswith(SQLITE):
        return None
    rest = url[len(SQLITE):].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def _set_sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


@dataclass
class SearchStorage:
    """An Optuna storage and how several processes coordinate on it (see the module docstring)."""

    url: Optional[str]  # None: in memory
    backend: optuna.storages.BaseStorage
    heartbeat: Optional[int]  # seconds between heartbeats; None without heartbeats (in memory)

    @property
    def sqlite_path(self) -> Optional[Path]:
        return _sqlite_path(self.url) if self.url else None

    @contextlib.contextmanager
    def lock(self, name: str = "dynexit") -> Iterator[None]:
        """Serialises trial creation (and study creation) between processes."""
        if self.url is None:
            yield
            return
        path = self.sqlite_path
        with (_file_lock(path) if path is not None else _server_lock(self.backend, name)):
            yield


@contextlib.contextmanager
def _file_lock(db_path: Path) -> Iterator[None]:
    with open(f"{db_path}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released by the OS if the process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _server_lock(backend, name: str) -> Iterator[None]:
    """An advisory lock on a PostgreSQL or MySQL server (other databases: none, with a warning)."""
    import sqlalchemy

    engine = getattr(backend, "engine", None)
    dialect = engine.dialect.name if engine is not None else ""
    if dialect not in ("postgresql", "mysql", "mariadb"):
        kind = dialect or type(backend).__name__
        if kind not in _UNLOCKED:
            _UNLOCKED.add(kind)
            log.warning("no cross-process lock for a %s storage: several workers may together run up to "
                        "(workers - 1) trials more than asked", kind)
        yield
        return
    digest = hashlib.sha1(f"dynexit-search:{name}".encode()).digest()
    with engine.connect() as conn:
        if dialect == "postgresql":
            key = int.from_bytes(digest[:8], "big", signed=True)
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            release = sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key}
        else:
            key = "dynexit-" + digest.hex()[:40]
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": key})
            release = sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": key}
        conn.commit()
        try:
            yield
        finally:
            conn.execute(*release)
            conn.commit()


def open_storage(url: Optional[str], heartbeat_interval: int = HEARTBEAT_S,
                 grace_period: int = GRACE_S) -> SearchStorage:
    """Opens (and creates, for SQLite) the storage at ``url``; ``None`` for an in-memory one."""
    if url is None:
        return SearchStorage(None, optuna.storages.InMemoryStorage(), None)
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"storage {url!r} is not a database URL (e.g. sqlite:///study.db, "
                         "postgresql://user@host/db)")
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise ValueError(f"need heartbeat_interval >= 1 and grace_period > heartbeat_interval, got "
                         f"{heartbeat_interval} and {grace_period}")
    path = _sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    # concurrent first opens of an SQLite file would race on creating its tables
    with (_file_lock(path) if path is not None else contextlib.nullcontext()):
        if path is not None:
            with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
                conn.execute("PRAGMA journal_mode=WAL")  # persistent: set once per file
        with _quiet():
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
            try:
                backend = optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period, heartbeat_stale_trial_callback=retry)
            except ImportError as err:
                raise ValueError(f"storage {url}: the database driver is not installed ({err})") from None
            except Exception as err:  # noqa: BLE001 - SQLAlchemy/driver errors, one clear line
                raise ValueError(f"cannot open storage {url}: {err}") from None
    if path is not None:
        import sqlalchemy

        sqlalchemy.event.listen(backend.engine, "connect", _set_sqlite_pragmas)
        backend.engine.dispose()  # later connections get the pragmas
    return SearchStorage(url, backend, heartbeat_interval)


def open_study(storage: SearchStorage, name: str, directions: Sequence[str], sampler: optuna.samplers.BaseSampler,
               pruner: Optional[optuna.pruners.BasePruner] = None,
               attrs: Optional[dict[str, Any]] = None) -> optuna.Study:
    """Creates study ``name`` with user attributes ``attrs``, or loads it and checks that it was created
    with the same ``directions`` and ``attrs`` (a study of other data is a ValueError, never mixed in)."""
    attrs = attrs or {}
    with storage.lock(name):
        try:
            study = optuna.load_study(study_name=name, storage=storage.backend, sampler=sampler, pruner=pruner)
        except KeyError:
            study = optuna.create_study(study_name=name, storage=storage.backend, sampler=sampler,
                                        pruner=pruner, directions=list(directions))
            for key, value in attrs.items():
                study.set_user_attr(key, value)
            log.info("created study %s%s", name, f" in {storage.url}" if storage.url else "")
            return study
    wanted = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
              for d in directions]
    if list(study.directions) != wanted:
        raise ValueError(f"study {name} in {storage.url} optimises {[d.name.lower() for d in study.directions]}, "
                         f"not {list(directions)}; use another --study-name or --storage")
    stored = study.user_attrs
    differ = [k for k, v in attrs.items() if k in stored and stored[k] != v]
    if differ:
        raise ValueError(f"study {name} in {storage.url} was created with other {', '.join(differ)} "
                         f"({', '.join(f'{k}={stored[k]!r}' for k in differ)}); use another --study-name "
                         "or --storage")
    log.info("resuming study %s (%d trials)", name, len(study.trials))
    return study


class _Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds in a background thread."""

    def __init__(self, backend, trial_id: int, interval: int):
        self.backend, self.trial_id, self.interval = backend, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.backend.record_heartbeat(self.trial_id)
            except Exception as err:  # noqa: BLE001 - a missed beat must not kill the trial
                log.warning("heartbeat of trial %d failed: %s", self.trial_id, err)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _claim(storage: SearchStorage, study: optuna.Study, study_id: int, n_trials: int) -> Optional[int]:
    """Under the lock: the id of a trial this process now runs (a queued one first, else a new one while
    the study holds fewer than ``n_trials`` taken trials), or None."""
    backend = storage.backend
    trials = study.get_trials(deepcopy=False)
    waiting = [t.number for t in trials if t.state == TrialState.WAITING]
    if not waiting:
        if sum(t.state in _TAKEN for t in trials) >= n_trials:
            return None
        # WAITING first: a worker killed before the claim leaves a trial that the next one takes over
        trial_id = backend.create_new_trial(study_id, optuna.trial.create_trial(state=TrialState.WAITING))
        candidates = [trial_id]
    else:
        candidates = [backend.get_trial_id_from_study_id_trial_number(study_id, n) for n in waiting]
    for trial_id in candidates:
        if storage.heartbeat:
            backend.record_heartbeat(trial_id)  # before RUNNING: a running trial always has a heartbeat
        try:
            if backend.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                study.get_trials(deepcopy=False)  # the study's trial cache learns the new trial
                return trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def fail_stale_trials(storage: SearchStorage, study: optuna.Study) -> None:
    """Marks the running trials of dead workers failed and queues a copy of each."""
    if storage.heartbeat:
        with _quiet():
            optuna.storages.fail_stale_trials(study)


def count_trials(study: optuna.Study, states=_FINISHED) -> int:
    return sum(t.state in states for t in study.get_trials(deepcopy=False))


def run_trials(storage: SearchStorage, study: optuna.Study, objective: Callable[[optuna.Trial], Any],
               n_trials: int, desc: str = "trials",
               sampler_for: Optional[Callable[[int], optuna.samplers.BaseSampler]] = None) -> int:
    """Runs ``objective`` on new trials of ``study`` until it holds ``n_trials`` finished (complete or
    pruned) trials, with any number of processes doing the same (see the module docstring); returns
    the number of trials this process finished.

    ``sampler_for(trial number)``: the sampler of each trial. Seeded by the trial's number, a trial draws
    new values whichever process runs it and however the study was resumed or extended; one sampler
    seeded once per process would draw the same values again in every process.

    ``objective(trial)`` returns the value(s) or raises ``optuna.TrialPruned``; any other exception
    marks the trial failed and propagates (running the command again resumes the study).
    """
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ValueError(f"the number of trials must be a positive integer, got {n_trials!r}")
    study_id = storage.backend.get_study_id_from_name(study.study_name)
    fail_stale_trials(storage, study)
    done = count_trials(study)
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=desc, disable=None, leave=False)
    ran = 0
    try:
        while True:
            with storage.lock(study.study_name):
                trial_id = _claim(storage, study, study_id, n_trials)
            if trial_id is None:
                running = count_trials(study, (TrialState.RUNNING,))
                if running == 0 or storage.heartbeat is None:
                    break
                time.sleep(POLL_S)  # other workers' trials, or a dead worker's until its grace period ends
                fail_stale_trials(storage, study)
                continue
            if sampler_for is not None:
                study.sampler = sampler_for(storage.backend.get_trial_number_from_id(trial_id))
            trial = optuna.Trial(study, trial_id)
            state, values = _run_one(storage, trial_id, trial, objective)
            with _quiet():
                frozen = study.tell(trial, values, state=state)
            if frozen.state == TrialState.FAIL:  # e.g. a NaN value: stop rather than retry for ever
                raise RuntimeError(f"trial {frozen.number} of study {study.study_name} failed: the "
                                   f"objective returned {values!r}")
            ran += 1
            bar.update(1)
    finally:
        bar.close()
    finished = count_trials(study)
    if finished < n_trials:
        log.warning("study %s holds %d finished trials of %d", study.study_name, finished, n_trials)
    return ran


def run_quick_trials(storage: SearchStorage, study: optuna.Study, objective: Callable[[optuna.Trial], Any],
                     n_trials: int, sampler: optuna.samplers.BaseSampler, desc: str = "trials",
                     batch_size: int = QUICK_BATCH) -> int:
    """Runs ``objective`` until ``study`` holds ``n_trials`` finished trials, sampling with ``sampler`` in
    an in-memory copy of the study and adding each finished trial to ``study`` in one transaction (see
    the module docstring); returns the number of trials this process added. For objectives of
    milliseconds: trials are not visible in the shared study while they run, and are added
    ``batch_size`` at a time (one lock and one read of the other workers' trials per batch; a killed
    worker loses at most one batch of evaluations).
    """
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ValueError(f"the number of trials must be a positive integer, got {n_trials!r}")
    with _quiet():
        local = optuna.create_study(directions=study.directions, sampler=sampler)
    seen: set[int] = set()  # numbers of the shared trials already in the local copy

    def sync() -> tuple[int, int]:
        """Copies the other workers' new finished trials into the local study; returns the numbers of
        finished and of all trials in the shared study."""
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in _FINISHED]
        for t in finished:
            if t.number not in seen:
                seen.add(t.number)
                local.add_trial(t)
        return len(finished), len(trials)

    with storage.lock(study.study_name):
        done, _ = sync()
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=desc, disable=None, leave=False)
    added = 0
    try:
        while done < n_trials:
            batch = [_quick_trial(local, objective, study.study_name) for _ in range(min(batch_size, n_trials - done))]
            with storage.lock(study.study_name):
                done, total = sync()
                for frozen in batch[:max(n_trials - done, 0)]:  # the rest: other workers finished the study
                    # under the lock nobody else adds a trial: this one gets the next number (and is in
                    # the local study already)
                    seen.add(total)
                    study.add_trial(frozen)
                    total, done, added = total + 1, done + 1, added + 1
                    bar.update(1)
    finally:
        bar.close()
    return added


def _quick_trial(local: optuna.Study, objective, name: str) -> optuna.trial.FrozenTrial:
    """One trial of the local study, as a finished trial ready to add to the shared one."""
    trial = local.ask()
    try:
        values, state = objective(trial), TrialState.COMPLETE
    except optuna.TrialPruned:
        values, state = None, TrialState.PRUNED
    with _quiet():
        frozen = local.tell(trial, values, state=state)
    if frozen.state == TrialState.FAIL:
        raise RuntimeError(f"a trial of study {name} failed: the objective returned {values!r}")
    # TPE's record of the parameters it sampled jointly matters only while a trial runs
    frozen.system_attrs = {k: v for k, v in frozen.system_attrs.items() if not k.startswith("tpe:relative_params")}
    return frozen


def _run_one(storage: SearchStorage, trial_id: int, trial: optuna.Trial, objective):
    beat = (_Heartbeat(storage.backend, trial_id, storage.heartbeat) if storage.heartbeat
            else contextlib.nullcontext())
    with beat:
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            return TrialState.PRUNED, None
        except BaseException:
            with _quiet():
                trial.study.tell(trial, state=TrialState.FAIL)
            raise
    return TrialState.COMPLETE, values
