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
from optuna.trial import FrozenTrial, TrialState

from sweeper import optuna_adapter, record


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


def ensure_tickets(study: optuna.Study, n_trials: int, first: list[dict[str, Any]] | None = None) -> int:
    """Enqueue WAITING tickets until the budget is ``n_trials``; returns how many were added.

    The ``first`` trials' parameters go on the first new tickets (Optuna's ``fixed_params``,
    which ``Trial.suggest_*`` returns instead of sampling), each once per study: a resumed
    launch finds them already queued, run, or retried. Workers claim the oldest ticket first,
    so they run before any trial the sampler proposes.
    """
    # Adding a trial is not repeated by the storage (a lost answer would add two); counting
    # first makes the whole of it safe to repeat: a repeat adds only what is still missing.
    added = optuna_adapter.call_with_retries(lambda: _add_missing(study, n_trials, first or []),
                                             what="adding tickets")
    record.N_TRIALS.set(study, n_trials)
    return added


def _add_missing(study: optuna.Study, n_trials: int, first: list[dict[str, Any]]) -> int:
    trials = study.get_trials(deepcopy=False)
    missing = max(0, n_trials - tally(trials).spent)
    queued = [record.FIXED_PARAMS.get(t) or {} for t in trials]
    fresh = [p for p in first if p not in queued][:missing]  # JSON gives back 1e-4 as 1e-4
    for params in fresh:
        study.enqueue_trial(params)
    for _ in range(missing - len(fresh)):
        study.enqueue_trial({})
    return missing


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


def gpu_seconds_spent(trials: list[FrozenTrial]) -> float:
    """Device-seconds of finished trials, plus the running ones' elapsed time so far."""
    total = 0.0
    now = time.time()
    for t in trials:
        if t.state.is_finished():
            total += float(record.GPU_SECONDS.get(t, 0.0))
        elif t.state == TrialState.RUNNING and t.datetime_start is not None:
            devices = int(record.DEVICES.get(t, 1))
            total += max(0.0, now - t.datetime_start.timestamp()) * devices
    return total
