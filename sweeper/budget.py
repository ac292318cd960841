"""The global trial budget, exact across every worker and machine.

Optuna's ``n_trials`` counts per process, and ``MaxTrialsCallback`` stops only after a trial
has already been created, so concurrent workers overshoot. sweeper instead turns the budget
into *tickets*: ``sweeper launch`` enqueues one WAITING trial per trial of the budget, and
workers only ever claim WAITING trials (Optuna's own atomic WAITING -> RUNNING transition);
they never create one. A ticket has no parameters, so the sampler still proposes them at the
moment a worker claims it, with everything finished so far in view.

A trial cut off by a dead or preempted worker is failed and replaced by a retry (a new
WAITING trial with the same parameters), so it keeps its place in the budget. What counts
as spent is every trial that finished (complete, pruned, or failed for good: a trial that
raised or diverged counts, so a study whose trials always fail still ends) plus every trial
waiting or running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from sweeper import optuna_adapter, record
from sweeper.errors import SweepError

TICKET_LOCK_WAIT_S = 120.0  # how long a creator waits for another one to finish adding tickets
TICKET_LOCK_POLL_S = 0.05  # ... looking this often
# The first key of PostgreSQL's two-key advisory lock that guards a study's tickets (the second
# is the study's id): a constant of sweeper's own, so no other advisory lock of the database's
# users collides with it.
TICKET_LOCK_CLASS = 0x5157


def superseded(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry has replaced."""
    replaced: set[int] = set()
    for t in trials:
        replaced.update(int(n) for n in record.RETRY_HISTORY.get(t, []))
    return replaced


@dataclass
class Tally:
    waiting: int
    running: int
    complete: int
    pruned: int
    failed: int  # failed for good (not replaced by a retry)
    retried: int  # failed, and replaced by a retry

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def spent(self) -> int:
        return self.finished + self.waiting + self.running


def tally(trials: list[FrozenTrial]) -> Tally:
    replaced = superseded(trials)
    count = {state: 0 for state in TrialState}
    retried = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.number in replaced:
            retried += 1
        else:
            count[t.state] += 1
    return Tally(count[TrialState.WAITING], count[TrialState.RUNNING], count[TrialState.COMPLETE],
                 count[TrialState.PRUNED], count[TrialState.FAIL], retried)


def ensure_tickets(study: optuna.Study, n_trials: int, first: list[dict[str, Any]] | None = None,
                   queue: int | None = None) -> int:
    """Enqueue WAITING tickets until the budget is ``n_trials``; returns how many were added.
    ``queue``: queue only this many of them now (``scheduler="pbt"``: the first segments of
    the population; ``pbt.py`` adds each later segment when the one before it ends).

    The ``first`` trials' parameters go on the first new tickets (Optuna's ``fixed_params``,
    which ``Trial.suggest_*`` returns instead of sampling), each once per study: a resumed
    launch finds them already queued, run, or retried. Workers claim the oldest ticket first,
    so they run before any trial the sampler proposes.

    A budget only grows: tickets already queued or run are never taken back, so the budget
    recorded on the study (``record.N_TRIALS``) is ``n_trials`` or what is already spent,
    whichever is more.
    """
    # Adding a trial is not repeated by the storage (a lost answer would add two); counting
    # first makes the whole of it safe to repeat: a repeat adds only what is still missing.
    return optuna_adapter.call_with_retries(lambda: _add_missing(study, n_trials, first or [], queue),
                                            what="adding tickets")


def _add_missing(study: optuna.Study, n_trials: int, first: list[dict[str, Any]], queue: int | None = None) -> int:
    # Count and add under one lock: two creators that both counted before either added would
    # each add the whole budget (issue 17.4: 50, 76 and 79 tickets for a budget of 40).
    with ticket_lock(study) as still_held:
        trials = study.get_trials(deepcopy=False)
        spent = tally(trials).spent
        missing = max(0, min(n_trials, n_trials if queue is None else queue) - spent)
        queued = [record.FIXED_PARAMS.get(t) or {} for t in trials]
        fresh = [p for p in first if p not in queued][:missing]  # JSON gives back 1e-4 as 1e-4
        for params in fresh + [{}] * (missing - len(fresh)):
            still_held()  # a lock lost with its connection: stop, and count again under a new one
            study.enqueue_trial(params)
        record.N_TRIALS.set(study, max(n_trials, spent))
    return missing


@contextlib.contextmanager
def ticket_lock(study: optuna.Study) -> Iterator[Any]:
    """Only one process at a time counts and adds the tickets of ``study``.

    PostgreSQL: an advisory lock of the session of a connection held for the purpose (a lock
    on the study's row would block Optuna's own trial inserts, which lock that row). SQLite:
    an exclusive ``flock`` on a file beside the database (not on the database file itself:
    closing another descriptor of it would drop SQLite's own locks). Both are released by the
    operating system or the server when the holder dies. Yields a check that raises a
    transient error if the lock was lost (its connection cut), so that the caller stops
    before adding a ticket and is repeated whole. Other storages (the gRPC proxy) are not
    locked: create the study on the database, or from one process.
    """
    rdb = optuna_adapter.rdb_of(optuna_adapter.storage_of(study))
    backend = rdb.engine.url.get_backend_name() if rdb is not None else ""
    if rdb is not None and backend == "postgresql":
        with _advisory_lock(rdb.engine, optuna_adapter.study_id(study)) as check:
            yield check
    elif rdb is not None and backend == "sqlite" and rdb.engine.url.database not in (None, "", ":memory:"):
        with _file_lock(f"{rdb.engine.url.database}.tickets.lock", study.study_name):
            yield lambda: None
    else:
        yield lambda: None


@contextlib.contextmanager
def _advisory_lock(engine: sqlalchemy.Engine, key: int) -> Iterator[Any]:
    take = sqlalchemy.text("SELECT pg_try_advisory_lock(:a, :b)")
    # Autocommit: the lock belongs to the session, and no transaction is left open beside it.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        _wait_until(lambda: bool(connection.execute(take, {"a": TICKET_LOCK_CLASS, "b": key}).scalar()),
                    f"study id {key}")

        def still_held() -> None:
            connection.execute(sqlalchemy.text("SELECT 1"))  # a cut connection raises a transient error

        try:
            yield still_held
        finally:
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:a, :b)"),
                                   {"a": TICKET_LOCK_CLASS, "b": key})
            except sqlalchemy.exc.DBAPIError:  # the connection is gone, and the lock with it
                pass


@contextlib.contextmanager
def _file_lock(path: str, what: str) -> Iterator[None]:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        def take() -> bool:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        _wait_until(take, f"study {what!r}")
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _wait_until(taken: Any, what: str) -> None:
    deadline = time.monotonic() + TICKET_LOCK_WAIT_S
    while not taken():
        if time.monotonic() > deadline:
            raise SweepError(f"another process has been adding the tickets of {what} for over "
                             f"{TICKET_LOCK_WAIT_S:g}s: wait for that `sweeper create` or `launch` to "
                             "finish (or stop it), then run this command again")
        time.sleep(TICKET_LOCK_POLL_S)


def out_of_time(study: optuna.Study) -> str | None:
    """Why no new trial may start (the deadline or the GPU-hours are spent), or None."""
    attrs = optuna_adapter.study_system_attrs(study)  # one read for both
    deadline: Any = attrs.get(record.DEADLINE.key)  # JSON numbers, as the launcher wrote them
    if deadline is not None and time.time() >= float(deadline):
        return "the sweep's time limit (--timeout) is reached"
    allowed: Any = attrs.get(record.GPU_SECONDS_BUDGET.key)
    if allowed is not None:
        trials = study.get_trials(deepcopy=False)
        if gpu_seconds_spent(trials) >= float(allowed):
            return f"the sweep's GPU-hours budget ({float(allowed) / 3600:g} h) is spent"
    return None


def run_started(trial: FrozenTrial | optuna.Trial) -> float | None:
    """When ``trial``'s current run began: its start, or its latest resumption after a pause
    (``pruner="asha"``), whose earlier runs ``GPU_SECONDS`` holds already."""
    resumed = [d["at"] for d in record.PROMOTION.get(trial, []) or [] if d.get("resumed")]
    if resumed:
        return float(resumed[-1])
    start = trial.datetime_start
    return start.timestamp() if start is not None else None


def gpu_seconds_spent(trials: list[FrozenTrial]) -> float:
    """Device-seconds of finished and paused trials, plus the running ones' current run so far
    (after their earlier runs, if they were paused)."""
    total = 0.0
    now = time.time()
    for t in trials:
        started = run_started(t)
        if t.state.is_finished() or t.state == TrialState.WAITING and started is not None:
            total += float(record.GPU_SECONDS.get(t, 0.0))  # a paused trial recorded its runs when it paused
        elif t.state == TrialState.RUNNING and started is not None:
            devices = float(record.DEVICES.get(t, 1))
            total += float(record.GPU_SECONDS.get(t, 0.0)) + max(0.0, now - started) * devices
    return total
