"""The one door to Optuna's internals, and the one place where storage calls are retried.

sweeper builds on Optuna's public API where it can. Where it cannot (claiming a ticket
instead of ``study.ask``, reading heartbeats a trial never wrote, a lighter read of unclaimed
tickets, a gRPC server it can stop gracefully), it reaches into Optuna here and nowhere else,
so that an Optuna upgrade means reading this file and ``tests/test_optuna_adapter.py``, whose
contract tests fail when Optuna changes what sweeper relies on.

Every storage that :func:`sweeper.storage.open_storage` builds is wrapped in
:class:`RetryingStorage`, in the manner of Optuna's own ``_CachedStorage``: a
:class:`~optuna.storages.BaseStorage` around another one. It repeats, with backoff, the calls
in :data:`RETRIED` when they fail with a transient error (a restarted or busy server, a
dropped connection, `sweeper proxy` restarting); the calls in :data:`NOT_RETRIED` are passed
through once, each for the reason given there. So every read and write of every worker,
launcher, reaper, proxy and ``finalize`` is covered, without a retry written at the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Callable, Container, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from sweeper.redact import mask

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_DEADLINE_S = 300.0  # how long a call is repeated while the storage is unreachable
RETRY_FIRST_DELAY_S = 0.5  # backoff: doubled after each failure ...
RETRY_MAX_DELAY_S = 10.0  # ... up to this

# --------------------------------------------------------------------------- transient errors

# A server that is there, but cannot take this connection now.
_BUSY = ("too many connections", "remaining connection slots are reserved", "the database system is starting up",
         "the database system is shutting down", "the database system is in recovery mode")
_TRANSIENT = _BUSY + ("server closed the connection", "terminating connection", "connection refused",
              "could not connect", "connection reset", "broken pipe", "ssl syscall",
              "database is locked", "connection timed out", "the database system is",
              "connection already closed", "cannot connect", "lost connection", "admin_shutdown",
              "no connection to the server", "timeout expired", "connection to server")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from, five deep (drivers wrap their errors)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()).lower()


def is_busy(exc: BaseException) -> bool:
    """True when the server is there but refuses a connection for now (at its connection
    limit, starting up, shutting down): worth waiting for even when opening a storage."""
    return any(s in _text(seen) for seen in _causes(exc) for s in _BUSY)


def is_transient(exc: BaseException) -> bool:
    """True for storage errors that a new connection fixes: a restarted or busy server."""
    for seen in _causes(exc):
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        # A grpc:// storage: `sweeper proxy` is down (UNAVAILABLE), or was stopping when the
        # call reached it (CANCELLED: it refuses new calls while it finishes those in flight).
        grpc = sys.modules.get("grpc")
        if grpc is not None and isinstance(seen, grpc.Call) and seen.code() in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return True
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                             optuna.exceptions.StorageInternalError, sqlalchemy.exc.TimeoutError)):
            if any(s in _text(seen) for s in _TRANSIENT):
                return True
    return False


# How long the calls of this thread (or task) are repeated: `patience` lowers it for callers
# that have something better to do than wait (the launcher's progress line).
_deadline_s: contextvars.ContextVar[float] = contextvars.ContextVar("sweeper_retry_deadline", default=RETRY_DEADLINE_S)


@contextlib.contextmanager
def patience(seconds: float) -> Iterator[None]:
    """Within this block, storage calls are repeated for at most ``seconds``."""
    token = _deadline_s.set(seconds)
    try:
        yield
    finally:
        _deadline_s.reset(token)


def _redact(text: str) -> str:
    return mask(" ".join(text.split()))[:160]


def call_with_retries(call: Callable[[], T], *, what: str) -> T:
    """``call()``, repeated with backoff while it fails with a transient storage error.

    For the storage calls in :data:`RETRIED` (through :class:`RetryingStorage`), and for the
    few operations that are safe to repeat *as a whole* although one of their calls is not
    (they read first and write only what is missing: ``budget.ensure_tickets``,
    ``worker.RetryCallback``).
    """
    start, delay, deadline = time.monotonic(), RETRY_FIRST_DELAY_S, _deadline_s.get()
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() - start > deadline:
                raise
            logger.warning("storage unavailable during %s (%s); retrying in %.1fs", what, _redact(str(exc)), delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)


# --------------------------------------------------------------------------- the storage wrapper

# The storage calls repeated on a transient error, and why repeating each is safe. A call can
# fail after the database committed it (the answer was lost with the connection): the reason
# says what the repeat then does.
RETRIED: dict[str, str] = {
    # Reads change nothing.
    "get_study_id_from_name": "a read", "get_study_name_from_id": "a read",
    "get_study_directions": "a read", "get_study_user_attrs": "a read",
    "get_study_system_attrs": "a read", "get_all_studies": "a read",
    "get_trial_id_from_study_id_trial_number": "a read", "get_trial_number_from_id": "a read",
    "get_trial_param": "a read", "get_trial": "a read", "get_all_trials": "a read",
    "get_n_trials": "a read", "get_best_trial": "a read", "get_trial_params": "a read",
    "get_trial_user_attrs": "a read", "get_trial_system_attrs": "a read",
    "get_heartbeat_interval": "a read", "_get_stale_trial_ids": "a read",
    # Attribute and value writes set a key to a value: writing the same value again is a no-op.
    "set_study_user_attr": "sets a key", "set_study_system_attr": "sets a key",
    "set_trial_user_attr": "sets a key", "set_trial_system_attr": "sets a key",
    "set_trial_intermediate_value": "sets the value of a step (Optuna updates the row it finds)",
    # One row per (trial, parameter): a repeat after a lost commit meets that row and raises
    # IntegrityError, which is not transient and reaches the caller; a repeat after a failed
    # commit writes it. Never a second parameter.
    "set_trial_param": "one row per trial and parameter",
    # A state change is a guarded transition: a repeat after a lost commit of a claim
    # (WAITING -> RUNNING) answers False, and the claimed trial, which never beats, is failed
    # and retried by the reaper after the grace period (liveness.stale_trial_ids judges it by
    # its start); a repeat of a lost finish raises UpdateFinishedTrialError, which the worker
    # reads as "already finished". Never a trial in two states, never counted twice.
    "set_trial_state_values": "a guarded transition (see the comment above)",
}
NOT_RETRIED: dict[str, str] = {
    "create_new_study": "a repeat after a lost commit fails with DuplicatedStudyError; "
                        "`create_study(load_if_exists=True)` is repeated whole instead",
    "delete_study": "sweeper never deletes a study; a repeat would raise KeyError",
    "create_new_trial": "a repeat after a lost commit would add a second trial to the budget; "
                        "its callers (ensure_tickets, RetryCallback) count first and are repeated whole",
    "record_heartbeat": "the heartbeat thread beats again at its next interval; a repeat would only delay it",
    "get_heartbeat_stale_trial_callback": "no storage call: the callback is held in memory",
    "remove_session": "no storage call",
    "check_trial_is_updatable": "no storage call",
}


class RetryingStorage(BaseStorage):
    """``inner`` with the calls of :data:`RETRIED` repeated on a transient error."""

    def __init__(self, inner: BaseStorage) -> None:
        self.inner = inner

    def _retry(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        return call_with_retries(lambda: method(*args, **kwargs), what=name)

    # ------------------------------------------------------------------ studies

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._retry("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._retry("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._retry("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._retry("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._retry("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._retry("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._retry("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._retry("get_all_studies")

    # ------------------------------------------------------------------ trials

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self.inner.create_new_trial(study_id, template_trial)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._retry("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._retry("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._retry("get_trial_number_from_id", trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._retry("get_trial_param", trial_id, param_name)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self._retry("set_trial_state_values", trial_id, state=state, values=values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._retry("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._retry("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._retry("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._retry("get_trial", trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._retry("get_all_trials", study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._retry("get_n_trials", study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._retry("get_best_trial", study_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._retry("get_trial_params", trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._retry("get_trial_user_attrs", trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._retry("get_trial_system_attrs", trial_id)

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)

    # ------------------------------------------------------------------ what sweeper needs of the inside

    @property
    def rdb(self) -> RDBStorage | None:
        """The RDB storage under the wrapper and Optuna's cache; None behind a proxy."""
        inner: Any = self.inner
        inner = getattr(inner, "_backend", inner)  # Optuna's _CachedStorage holds its RDBStorage there
        return inner if isinstance(inner, RDBStorage) else None

    @property
    def engine(self) -> sqlalchemy.Engine:
        """The SQLAlchemy engine of an RDB storage (AttributeError behind a proxy, as on the proxy itself)."""
        if self.rdb is None:
            raise AttributeError("engine")
        return self.rdb.engine

    def dispose(self) -> None:
        """Give the pooled connections back now, not when the process exits."""
        if self.rdb is not None:
            self.rdb.engine.dispose()


class RetryingHeartbeatStorage(RetryingStorage, BaseHeartbeat):
    """:class:`RetryingStorage` over a storage that keeps Optuna's heartbeats (an RDB storage)."""

    def record_heartbeat(self, trial_id: int) -> None:
        self.inner.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self._retry("_get_stale_trial_ids", study_id)

    def get_heartbeat_interval(self) -> int | None:
        return self.inner.get_heartbeat_interval()  # type: ignore[attr-defined]

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.inner.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]


def wrap(storage: BaseStorage) -> RetryingStorage:
    """``storage`` with retries; an RDB storage gets Optuna's cache first, as ``load_study``
    would give it (a wrapper is not an RDBStorage, so Optuna no longer adds the cache itself)."""
    if isinstance(storage, RetryingStorage):
        return storage
    if isinstance(storage, RDBStorage):
        storage = optuna.storages.get_storage(storage)  # Optuna's _CachedStorage around it
    if isinstance(storage, BaseHeartbeat):
        return RetryingHeartbeatStorage(storage)
    return RetryingStorage(storage)


def rdb_of(storage: BaseStorage) -> RDBStorage | None:
    """The RDB storage inside ``storage`` (wrapped, cached or bare); None for any other kind."""
    if isinstance(storage, RetryingStorage):
        return storage.rdb
    inner: Any = getattr(storage, "_backend", storage)
    return inner if isinstance(inner, RDBStorage) else None


# --------------------------------------------------------------------------- study and trial handles


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def frozen_study_id(study: FrozenStudy) -> int:
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def trial_system_attrs(trial: optuna.Trial | FrozenTrial) -> dict[str, Any]:
    """System attributes of a trial; a live Trial no longer exposes them in Optuna 5."""
    if isinstance(trial, FrozenTrial):
        return trial.system_attrs
    return trial.study._storage.get_trial_system_attrs(trial._trial_id)


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    # Study.system_attrs is gone in Optuna 5; the storage still has them.
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def set_trial_system_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    # Trial.set_system_attr is gone in Optuna 5; the storage still sets them.
    trial.study._storage.set_trial_system_attr(trial._trial_id, key, value)


def frozen(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as the storage has it now."""
    return study._storage.get_trial(trial._trial_id)


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """True when the storage keeps Optuna's own heartbeats (an RDB storage with an interval)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


# --------------------------------------------------------------------------- claiming and telling


def forget_cached_trials(study: optuna.Study) -> None:
    """Drop the study's per-thread trial list, as ``Study.ask`` does, so a claim sees new tickets."""
    study._thread_local.cached_all_trials = None


def read_study_into_cache(study: optuna.Study) -> None:
    """One read of the study into its per-thread list, which the sampler then reuses (as it
    reuses the read of ``Study.ask``) instead of making its own."""
    study._get_trials(deepcopy=False, use_cache=True)


def tell_without_readback(study: optuna.Study, trial: optuna.Trial, state: TrialState,
                          value: float | None = None) -> None:
    """What ``Study.tell(..., skip_if_finished=True)`` does, less its last step: reading the
    finished trial back to return it, a full trial read per trial that no one here uses
    (``Study.optimize`` skips it the same way; measured by bench/orchestration.py, issue 7)."""
    from optuna.study._tell import _tell_with_warning

    if state == TrialState.COMPLETE:
        _tell_with_warning(study, trial, value, skip_if_finished=True)
    else:
        _tell_with_warning(study, trial, state=state, skip_if_finished=True)


def waiting_trial_ids(study: optuna.Study, *, paused: bool = False) -> list[int]:
    """Ids of the study's waiting trials that never started (tickets and retries), oldest
    first, for a worker about to claim one; with ``paused``, those that did start: the trials
    that ``pruner="asha"`` paused (``promotion.py``), which only a promotion claims.

    On an RDB storage one light query, rather than a refresh of the whole cached study (about
    seven queries) that the claim does not need: the sampler refreshes it right after, when
    the claimed trial is built (``bench/orchestration.py``, issue 7).
    """
    from optuna.storages._rdb import models

    rdb = rdb_of(study._storage)
    if rdb is None:
        trials = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        return [t._trial_id for t in trials if (t.datetime_start is not None) == paused]
    trial = models.TrialModel
    started = trial._datetime_start_utc.isnot(None) if paused else trial._datetime_start_utc.is_(None)
    query = (sqlalchemy.select(trial.trial_id)
             .where(trial.study_id == study._study_id, trial.state == TrialState.WAITING, started)
             .order_by(trial.trial_id))

    def read() -> list[int]:
        with rdb.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    return call_with_retries(read, what="listing tickets")


# --------------------------------------------------------------------------- liveness


def trial_silences(study: optuna.Study) -> dict[int, float] | None:
    """Seconds since each running trial of an RDB storage with heartbeats last showed life.

    As Optuna's own ``_get_stale_trial_ids`` measures it (the last heartbeat, by the database's
    clock), and also for the trials that never beat at all: a worker killed between claiming a
    trial and its first heartbeat would otherwise leave the trial running forever (Optuna
    skips trials without a heartbeat row). Those are judged by their start time, which the
    claiming worker wrote with its own clock, in UTC, as Optuna 5 stores it. None when the
    storage keeps no heartbeats of Optuna's (the caller reads the attribute heartbeat).
    """
    from optuna.storages._rdb import models

    storage = study._storage
    rdb = rdb_of(storage)
    if rdb is None or not heartbeat_enabled(storage):
        return None
    trial, beat = models.TrialModel, models.TrialHeartbeatModel

    def read() -> tuple[Any, list[Any]]:
        with rdb.engine.connect() as conn:
            db_now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one()
            rows = conn.execute(
                sqlalchemy.select(trial.trial_id, trial._datetime_start_utc, beat.heartbeat)
                .outerjoin(beat, beat.trial_id == trial.trial_id)
                .where(trial.study_id == study._study_id, trial.state == TrialState.RUNNING)
            ).all()
        return db_now, list(rows)

    db_now, rows = call_with_retries(read, what="finding stale trials")
    if isinstance(db_now, str):  # SQLite hands CURRENT_TIMESTAMP back as text
        db_now = datetime.fromisoformat(db_now)
    db_now, utc_now = db_now.replace(tzinfo=None), datetime.now(UTC).replace(tzinfo=None)
    silences: dict[int, float] = {}
    for trial_id_, started, last_beat in rows:
        if last_beat is not None:
            silences[trial_id_] = (db_now - last_beat) / timedelta(seconds=1)
        elif started is not None:
            silences[trial_id_] = (utc_now - started) / timedelta(seconds=1)
    return silences


def storage_grace_period(storage: BaseStorage) -> float | None:
    """The grace period an RDB storage was opened with (Optuna's default: twice the interval)."""
    rdb = rdb_of(storage)
    if rdb is None:
        return None
    if rdb.grace_period is not None:
        return float(rdb.grace_period)
    interval = rdb.get_heartbeat_interval()
    return 2.0 * interval if interval is not None else None


# --------------------------------------------------------------------------- reading tickets


def read_tickets_lightly(storage: BaseStorage) -> None:
    """Make a worker's RDB ``storage`` stop re-reading the waiting trials its cache holds.

    Optuna's storage cache re-reads every unfinished trial at every read of the study, and a
    worker reads the study whenever its sampler proposes and its pruner judges. The budget's
    unclaimed tickets are unfinished trials, so each read loaded the whole remaining budget:
    with 160 tickets a read took about 20 ms instead of 3 on PostgreSQL, and on a trivial
    objective sweeper's workers spent 1.8 to 2.1 times plain Optuna's time per trial
    (``bench/orchestration.py``, issue 7).

    A waiting trial that never started does not change until a worker claims it (Optuna
    creates waiting trials whole, and the claim makes them RUNNING; a trial that
    ``pruner="asha"`` paused is waiting again with its start time, and is read as it is), and the cache has seen every trial of the study
    up to the highest id it holds (it reads everything above its last finished trial, and the
    study's lock keeps trial ids in creation order). So the read this installs is Optuna's own
    query with one more condition, and no list of ids: leave out the trials that are still
    waiting and that the cache already holds, that is, those up to that id. The cache keeps
    its identical records of them and sees everything else as Optuna's read shows it, from one
    query and so one snapshot. Other storages are left as they are.
    """
    rdb = rdb_of(storage)
    if rdb is None or getattr(rdb, "_sweeper_light_tickets", False):
        return

    def _get_trials(study_id: int, states: Any, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import orm

        seen_up_to = max(included_trial_ids, default=-1)
        seen_up_to = max(seen_up_to, trial_id_greater_than)  # the cache holds every trial up to here
        trial = models.TrialModel
        scope = trial.trial_id > trial_id_greater_than
        older = [t for t in included_trial_ids if t <= trial_id_greater_than]
        if older:
            scope = sqlalchemy.or_(trial.trial_id.in_(older), scope)
        with _create_scoped_session(rdb.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session)  # as Optuna's read does
            query = session.query(trial).filter(trial.study_id == study_id, scope)
            for relation in (trial.params, trial.values, trial.user_attributes, trial.system_attributes,
                             trial.intermediate_values):
                query = query.options(orm.selectinload(relation))
            if states is not None:
                query = query.filter(trial.state.in_(states))
            if seen_up_to >= 0:
                # A paused trial (waiting again, with a start time: promotion.py) did change: read it.
                query = query.filter(sqlalchemy.or_(trial.state != TrialState.WAITING, trial.trial_id > seen_up_to,
                                                    trial._datetime_start_utc.isnot(None)))
            return [rdb._build_frozen_trial_from_trial_model(t) for t in query.order_by(trial.trial_id).all()]

    rdb._get_trials = _get_trials  # type: ignore[method-assign]
    rdb._sweeper_light_tickets = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the gRPC proxy


def make_grpc_server(storage: BaseStorage, host: str, port: int, executor: Any) -> Any:
    """Optuna's gRPC storage server, not started. ``run_grpc_proxy_server`` is only this,
    ``start`` and ``wait``: with the server in hand, SIGTERM lets the calls in flight finish
    instead of cutting them off, so that a worker never sees a claim or a tell fail that did
    happen."""
    from optuna.storages._grpc.server import make_server

    return make_server(storage, host, port, executor)
