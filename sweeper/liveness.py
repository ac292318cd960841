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

A trial that ``pruner="asha"`` paused is WAITING, not RUNNING, so no reaper judges it while it
waits; the worker that promotes it renews its beat (:func:`renew`) before claiming it back, so
the beat it left when it paused does not make it look dead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper import optuna_adapter, record
from sweeper.storage import mask

logger = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

Retry = Callable[[optuna.Study, FrozenTrial], None]


def native(storage: Any) -> bool:
    """True when the storage keeps Optuna's own heartbeats (an RDB storage with an interval)."""
    return optuna_adapter.heartbeat_enabled(storage)


def mark_owner(trial: optuna.Trial) -> None:
    """Record which process runs ``trial``, for the owner check."""
    host, pid = socket.gethostname(), os.getpid()
    record.HOST.set(trial, host)
    record.PID.set(trial, pid)


def renew(storage: Any, trial_id: int) -> None:
    """One beat for ``trial_id`` now, of the kind the storage keeps."""
    if native(storage):
        storage.record_heartbeat(trial_id)
    else:
        storage.set_trial_system_attr(trial_id, record.HEARTBEAT_AT.key, time.time())


class Heartbeat:
    """A thread that keeps its trials alive (one, or the members of an array as they come and
    go); a failed beat is logged and retried, never fatal."""

    def __init__(self, storage: Any, trial_id: int | None, interval: float) -> None:
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set() if trial_id is None else {trial_id}
        self.native = native(storage)
        if self.native:
            self.interval = storage.get_heartbeat_interval()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="sweeper-heartbeat", daemon=True)

    def add(self, trial_id: int) -> None:
        self.trial_ids = self.trial_ids | {trial_id}  # a new set: the thread may be reading the old one

    def discard(self, trial_id: int) -> None:
        self.trial_ids = self.trial_ids - {trial_id}

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=30)

    def _beat(self) -> None:
        while not self.done.is_set():
            for trial_id in self.trial_ids:
                try:
                    if self.native:
                        self.storage.record_heartbeat(trial_id)
                    else:
                        self.storage.set_trial_system_attr(trial_id, record.HEARTBEAT_AT.key, time.time())
                except optuna.exceptions.UpdateFinishedTrialError:
                    self.discard(trial_id)  # somebody failed the trial (a long stall): nothing left to keep alive
                except Exception as exc:  # the storage is briefly down: the next beat tries again
                    logger.warning("heartbeat failed: %s", mask(" ".join(str(exc).split()))[:160])
            self.done.wait(self.interval)


def fail_trial(study: optuna.Study, trial: FrozenTrial, retry: Retry, reason: str) -> bool:
    """Fail a running ``trial`` and queue its retry; False if someone else got there first."""
    storage, trial_id = optuna_adapter.storage_of(study), optuna_adapter.trial_id(trial)
    try:
        storage.set_trial_user_attr(trial_id, record.FAIL_REASON.key, reason)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    logger.warning("trial %d failed: %s", trial.number, reason)
    retry(study, storage.get_trial(trial_id))
    return True


def running(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def reap(study: optuna.Study, grace: float, retry: Retry, clock: Callable[[], float] = time.time) -> list[int]:
    """Fail the running trials whose heartbeat is older than ``grace`` seconds.

    ``clock`` is the reaper's idea of now: the tests hand it one that runs ahead instead of
    sleeping past a grace period. Native heartbeats are timed by the database's clock, and
    moved on by as much as ``clock`` is ahead of this machine's.
    """
    ahead = clock() - time.time()
    silences = optuna_adapter.trial_silences(study)
    if silences is not None:
        # One query in the common case (nothing is stale); grace is the storage's own.
        storage = optuna_adapter.storage_of(study)
        grace = optuna_adapter.storage_grace_period(storage) or grace
        reaped = []
        for trial_id, silent in silences.items():
            if silent + ahead <= grace:
                continue
            trial = storage.get_trial(trial_id)
            if fail_trial(study, trial, retry, "no heartbeat within the grace period: its worker died"):
                reaped.append(trial.number)
        return reaped
    reaped = []
    now = clock()
    for trial in running(study):
        last = record.HEARTBEAT_AT.get(trial)
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
        pid = record.PID.get(trial)
        if record.HOST.get(trial) == host and pid in dead:
            if fail_trial(study, trial, retry, f"its worker (pid {pid} on {host}) died"):
                reaped.append(trial.number)
    return reaped
