"""Liveness: noticing that a trial's worker is gone, and giving the trial back to the budget.

Three ways, each ending the same way (the trial is failed and a retry with the same
parameters is queued by :class:`sweeper.worker.RetryCallback`):

1. *Owner check*, immediate: every running trial records its worker's ``host`` and ``pid``;
   the launcher that sees one of its worker processes die fails that worker's trials at once,
   without waiting for a grace period.
2. *Optuna's heartbeat* on RDB storages: the worker records a heartbeat every interval, and a
   trial whose heartbeat is older than the grace period is failed by whoever looks next (every
   worker before it claims a trial, and the launcher every few seconds, since Optuna alone
   looks only when some worker starts a trial).
3. *Attribute heartbeat* where the storage has none (Optuna's gRPC storage proxy, journal
   storages): the worker writes the time into the trial's ``heartbeat_at`` user attribute, and
   the same reaping compares it with the grace period. This is what keeps a sweep behind
   ``sweeper proxy`` from waiting forever on a trial whose machine died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from sweeper.storage import mask, retrying

logger = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

USER_HOST = "host"
USER_PID = "pid"
USER_BEAT = "heartbeat_at"  # epoch seconds, for storages without a native heartbeat

Retry = Callable[[optuna.Study, FrozenTrial], None]


def native(storage: Any) -> bool:
    """True when the storage keeps Optuna's own heartbeats (an RDB storage with an interval)."""
    return is_heartbeat_enabled(storage)


def mark_owner(trial: optuna.Trial) -> None:
    """Record which process runs ``trial``, for the owner check."""
    host, pid = socket.gethostname(), os.getpid()
    retrying(lambda: trial.set_user_attr(USER_HOST, host), what="recording the host")
    retrying(lambda: trial.set_user_attr(USER_PID, pid), what="recording the pid")


class Heartbeat:
    """A thread that keeps ``trial_id`` alive; a failed beat is logged and retried, never fatal."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.native = native(storage)
        if self.native:
            self.interval = storage.get_heartbeat_interval()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="sweeper-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=30)

    def _beat(self) -> None:
        while not self.done.is_set():
            try:
                if self.native:
                    self.storage.record_heartbeat(self.trial_id)
                else:
                    self.storage.set_trial_user_attr(self.trial_id, USER_BEAT, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # somebody failed the trial (a long stall): nothing left to keep alive
            except Exception as exc:  # the storage is briefly down: the next beat tries again
                logger.warning("heartbeat failed: %s", mask(" ".join(str(exc).split()))[:160])
            self.done.wait(self.interval)


def fail_trial(study: optuna.Study, trial: FrozenTrial, retry: Retry, reason: str) -> bool:
    """Fail a running ``trial`` and queue its retry; False if someone else got there first."""
    storage = study._storage
    try:
        retrying(lambda: storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason),
                 what="recording the reason")
        if not retrying(lambda: storage.set_trial_state_values(trial._trial_id, TrialState.FAIL),
                        what="failing a trial"):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    logger.warning("trial %d failed: %s", trial.number, reason)
    retry(study, retrying(lambda: storage.get_trial(trial._trial_id), what="reading the trial"))
    return True


def running(study: optuna.Study) -> list[FrozenTrial]:
    return retrying(lambda: study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                    what="reading running trials")


def stale_trial_ids(storage: Any, study_id: int) -> list[int]:
    """Running trials of an RDB storage with heartbeats whose worker has gone quiet.

    As Optuna's own ``_get_stale_trial_ids`` (a heartbeat older than the grace period, by the
    database's clock), and also the trials that never beat at all: a worker killed between
    claiming a trial and its first heartbeat would otherwise leave the trial running forever
    (Optuna skips trials without a heartbeat row). Those are judged by their start time, which
    the claiming worker wrote with its own clock, in UTC, as Optuna 5 stores it.
    """
    rdb = getattr(storage, "_backend", storage)  # under Optuna's cache, its RDBStorage
    grace = timedelta(seconds=rdb.grace_period if rdb.grace_period is not None
                      else 2 * rdb.get_heartbeat_interval())
    engine = rdb.engine
    trial, beat = models.TrialModel, models.TrialHeartbeatModel
    with engine.connect() as conn:
        db_now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one()
        rows = conn.execute(
            sqlalchemy.select(trial.trial_id, trial._datetime_start_utc, beat.heartbeat)
            .outerjoin(beat, beat.trial_id == trial.trial_id)
            .where(trial.study_id == study_id, trial.state == TrialState.RUNNING)
        ).all()
    if isinstance(db_now, str):  # SQLite hands CURRENT_TIMESTAMP back as text
        db_now = datetime.fromisoformat(db_now)
    db_now, utc_now = db_now.replace(tzinfo=None), datetime.now(UTC).replace(tzinfo=None)
    stale = []
    for trial_id, started, last_beat in rows:
        if last_beat is not None:
            if db_now - last_beat > grace:
                stale.append(trial_id)
        elif started is not None and utc_now - started > grace:
            stale.append(trial_id)
    return stale


def reap(study: optuna.Study, grace: float, retry: Retry) -> list[int]:
    """Fail the running trials whose heartbeat is older than ``grace`` seconds."""
    storage = study._storage
    if native(storage):
        # One query in the common case (nothing is stale); grace is the storage's own.
        stale = retrying(lambda: stale_trial_ids(storage, study._study_id), what="finding stale trials")
        reaped = []
        for trial_id in stale:
            trial = retrying(lambda: storage.get_trial(trial_id), what="reading a stale trial")
            if fail_trial(study, trial, retry, "no heartbeat within the grace period: its worker died"):
                reaped.append(trial.number)
        return reaped
    reaped = []
    now = time.time()
    for trial in running(study):
        last = trial.user_attrs.get(USER_BEAT)
        if last is None and trial.datetime_start is not None:
            last = trial.datetime_start.timestamp()
        if last is not None and now - float(last) > grace:
            if fail_trial(study, trial, retry, f"no heartbeat for {now - float(last):.0f}s: its worker died"):
                reaped.append(trial.number)
    return reaped


def reap_dead(study: optuna.Study, pids: Iterable[int], retry: Retry, host: str | None = None) -> list[int]:
    """Fail at once the running trials of worker processes ``pids`` on ``host`` (this one)."""
    host = host or socket.gethostname()
    dead = set(pids)
    reaped = []
    for trial in running(study):
        if trial.user_attrs.get(USER_HOST) == host and trial.user_attrs.get(USER_PID) in dead:
            pid = trial.user_attrs[USER_PID]
            if fail_trial(study, trial, retry, f"its worker (pid {pid} on {host}) died"):
                reaped.append(trial.number)
    return reaped
