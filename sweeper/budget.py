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

import time
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from sweeper.storage import retrying

# Study system attributes (set by `sweeper launch`, read by every worker).
ATTR_DEADLINE = "sweeper:deadline"  # epoch seconds after which no new trial starts
ATTR_GPU_SECONDS = "sweeper:gpu_seconds_budget"  # device-seconds the sweep may spend
ATTR_N_TRIALS = "sweeper:n_trials"

# Trial user attribute: device-seconds a finished trial used (elapsed time x devices).
USER_GPU_SECONDS = "gpu_seconds"


def superseded(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry has replaced."""
    replaced: set[int] = set()
    for t in trials:
        replaced.update(int(n) for n in t.system_attrs.get("retry_history", []))
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


def ensure_tickets(study: optuna.Study, n_trials: int, first: list[dict[str, Any]] | None = None) -> int:
    """Enqueue WAITING tickets until the budget is ``n_trials``; returns how many were added.

    The ``first`` trials' parameters go on the first new tickets (Optuna's ``fixed_params``,
    which ``Trial.suggest_*`` returns instead of sampling), each once per study: a resumed
    launch finds them already queued, run, or retried. Workers claim the oldest ticket first,
    so they run before any trial the sampler proposes.
    """
    trials = retrying(lambda: study.get_trials(deepcopy=False), what="reading trials")
    missing = max(0, n_trials - tally(trials).spent)
    queued = [t.system_attrs.get("fixed_params") or {} for t in trials]
    fresh = [p for p in first or [] if p not in queued][:missing]  # JSON gives back 1e-4 as 1e-4
    for params in fresh:
        retrying(lambda: study.enqueue_trial(params), what="adding a first trial")
    for _ in range(missing - len(fresh)):
        retrying(lambda: study.enqueue_trial({}), what="adding a ticket")
    retrying(lambda: study._storage.set_study_system_attr(study._study_id, ATTR_N_TRIALS, n_trials),
             what="recording the budget")
    return missing


def out_of_time(study: optuna.Study) -> str | None:
    """Why no new trial may start (the deadline or the GPU-hours are spent), or None."""
    attrs = retrying(lambda: study_system_attrs(study), what="reading the budget")
    deadline: Any = attrs.get(ATTR_DEADLINE)  # JSON numbers, as the launcher wrote them
    if deadline is not None and time.time() >= float(deadline):
        return "the sweep's time limit (--timeout) is reached"
    allowed: Any = attrs.get(ATTR_GPU_SECONDS)
    if allowed is not None:
        trials = retrying(lambda: study.get_trials(deepcopy=False), what="reading trials")
        if gpu_seconds_spent(trials) >= float(allowed):
            return f"the sweep's GPU-hours budget ({float(allowed) / 3600:g} h) is spent"
    return None


def study_system_attrs(study: optuna.Study) -> dict[str, object]:
    # Study.system_attrs is gone in Optuna 5; the storage still has them.
    return study._storage.get_study_system_attrs(study._study_id)


def gpu_seconds_spent(trials: list[FrozenTrial]) -> float:
    """Device-seconds of finished trials, plus the running ones' elapsed time so far."""
    total = 0.0
    now = time.time()
    for t in trials:
        if t.state.is_finished():
            total += float(t.user_attrs.get(USER_GPU_SECONDS, 0.0))
        elif t.state == TrialState.RUNNING and t.datetime_start is not None:
            devices = int(t.user_attrs.get("devices", 1))
            total += max(0.0, now - t.datetime_start.timestamp()) * devices
    return total


# --------------------------------------------------------------------------- reading tickets


def read_tickets_lightly(storage: object) -> None:
    """Make a worker's RDB ``storage`` stop re-reading the waiting trials its cache holds.

    Optuna's storage cache re-reads every unfinished trial at every read of the study, and a
    worker reads the study whenever its sampler proposes and its pruner judges. The budget's
    unclaimed tickets are unfinished trials, so each read loaded the whole remaining budget:
    with 160 tickets a read took about 20 ms instead of 3 on PostgreSQL, and on a trivial
    objective sweeper's workers spent 1.8 to 2.1 times plain Optuna's time per trial
    (``bench/orchestration.py``, issue 7).

    A waiting trial does not change until a worker claims it (Optuna creates waiting trials
    whole, and the claim makes them RUNNING), and the cache has seen every trial of the study
    up to the highest id it holds (it reads everything above its last finished trial, and the
    study's lock keeps trial ids in creation order). So the read this installs is Optuna's own
    query with one more condition, and no list of ids: leave out the trials that are still
    waiting and that the cache already holds, that is, those up to that id. The cache keeps
    its identical records of them and sees everything else as Optuna's read shows it, from one
    query and so one snapshot. Other storages are left as they are.
    """
    from optuna.storages import RDBStorage

    if not isinstance(storage, RDBStorage) or getattr(storage, "_sweeper_light_tickets", False):
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
        with _create_scoped_session(storage.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session)  # as Optuna's read does
            query = session.query(trial).filter(trial.study_id == study_id, scope)
            for relation in (trial.params, trial.values, trial.user_attributes, trial.system_attributes,
                             trial.intermediate_values):
                query = query.options(orm.selectinload(relation))
            if states is not None:
                query = query.filter(trial.state.in_(states))
            if seen_up_to >= 0:
                query = query.filter(sqlalchemy.or_(trial.state != TrialState.WAITING, trial.trial_id > seen_up_to))
            return [storage._build_frozen_trial_from_trial_model(t) for t in query.order_by(trial.trial_id).all()]

    storage._get_trials = _get_trials  # type: ignore[method-assign]
    storage._sweeper_light_tickets = True  # type: ignore[attr-defined]


def waiting_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of the study's waiting trials, oldest first, for a worker about to claim one.

    On an RDB storage one light query, rather than a refresh of the whole cached study (about
    seven queries) that the claim does not need: the sampler refreshes it right after, when
    the claimed trial is built (``bench/orchestration.py``, issue 7).
    """
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models

    backend = getattr(study._storage, "_backend", study._storage)
    if not isinstance(backend, RDBStorage):
        trials = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        return [t._trial_id for t in trials]
    trial = models.TrialModel
    query = (sqlalchemy.select(trial.trial_id)
             .where(trial.study_id == study._study_id, trial.state == TrialState.WAITING)
             .order_by(trial.trial_id))
    with backend.engine.connect() as connection:
        return list(connection.execute(query).scalars())
