"""``pruner="asha"``: asynchronous successive halving with promotion (Li et al. 2020, "A
System for Massively Parallel Hyperparameter Tuning"; Syne Tune's ``type="promotion"``).

Rungs sit at evaluations r, r·η, r·η², ... (r = 1, η = the study's ``reduction_factor``),
below the evaluations a whole trial makes. A trial that reaches a rung goes on at once only if
it is in the top ⌊n/η⌋ of the n trials that have reached that rung so far; otherwise it
*pauses*: it keeps the resume state it has just saved and gives its worker back. Whenever a
worker looks for work, a paused trial that is now in the top ⌊n/η⌋ of its rung (more trials
have reached it since) is *promoted* first, highest rung first and best first, and continues
from its resume state bit for bit; only then are new tickets claimed. Optuna declined to build
this because it needs saved model state (Optuna PR 404, issue 3351); sweeper has one for every
running trial.

How a paused trial looks in Optuna, so that the dashboard, ``sweeper status`` and
``optuna.load_study`` see an ordinary study and the budget stays exact:

- it is WAITING again (Optuna's storages allow RUNNING -> WAITING; only finished trials are
  frozen), with its start time, parameters, intermediate values and attributes kept. A waiting
  trial that has a start time is paused: a ticket or a retry never started. So it still counts
  as spent in the ticket budget, no reaper looks at it (they judge RUNNING trials only), and
  claiming it back is Optuna's own atomic WAITING -> RUNNING, as for a ticket;
- every decision is appended to its ``sweeper:promotion`` system attribute (docs/records.md;
  the report lists them per trial, ``sweeper status`` the paused trials): ``promote`` (it went
  on at once, or was resumed), ``pause``, and ``prune`` for a trial still paused when
  the sweep ends (no ticket left, nothing running: no promotion can reach it any more). Such a
  trial is told PRUNED with its best evaluation as its value, and its resume state is deleted,
  so storage stays bounded.

The rung arithmetic (:func:`rungs`, :func:`goes_on`, :func:`promotable`) is pure; the storage
operations (:func:`judge`, :func:`park`, :func:`promote`, :func:`close`) are called by the
objective and the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, liveness, optuna_adapter, record

logger = logging.getLogger(__name__)

MIN_RESOURCE = 1  # the first rung: evaluation 1
PAUSE, PROMOTE, PRUNE = "pause", "promote", "prune"


class Paused(Exception):
    """Raised from an evaluation at a rung: the trial stops here, its resume state kept."""


# --------------------------------------------------------------------------- the rung arithmetic


def rungs(max_evaluations: int, eta: int, min_resource: int = MIN_RESOURCE) -> list[int]:
    """The evaluations that are rungs: r, r·η, r·η², ... below ``max_evaluations`` (a trial's
    last evaluation is its end, not a rung). With ``max_evaluations`` 0 (not known before the
    batch size is: ``eval_every_steps``) every power is a rung; 64 of them bound the list."""
    found: list[int] = []
    level = min_resource
    while (level < max_evaluations if max_evaluations else len(found) < 64):
        found.append(level)
        level *= eta
    return found


@dataclass(frozen=True)
class Entry:
    """One trial's value at a rung."""

    number: int
    value: float


def ordered(entries: Iterable[Entry], direction: StudyDirection) -> list[Entry]:
    """Best first; a tie goes to the earlier trial (as ``record.ranked`` ranks)."""
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    return sorted(entries, key=lambda e: (sign * e.value, e.number))


def top(entries: Iterable[Entry], eta: int, direction: StudyDirection) -> list[int]:
    """Numbers of the trials in the top ⌊n/η⌋ of a rung's n entries, best first."""
    order = ordered(entries, direction)
    return [e.number for e in order[:len(order) // eta]]


def goes_on(entries: Iterable[Entry], number: int, eta: int, direction: StudyDirection) -> bool:
    """Whether trial ``number``, one of a rung's ``entries``, is in its top ⌊n/η⌋ now."""
    return number in top(entries, eta, direction)


def rung_entries(trials: Iterable[FrozenTrial], evaluation: int) -> list[Entry]:
    """Every trial's value at evaluation ``evaluation``, each retry lineage once (a failed trial
    that a retry replaced is left out: the retry reports the same curve)."""
    trials = list(trials)
    replaced = budget.superseded(trials)
    return [Entry(t.number, float(t.intermediate_values[evaluation])) for t in trials
            if evaluation in t.intermediate_values and t.number not in replaced]


def decisions(trial: optuna.Trial | FrozenTrial) -> list[dict[str, Any]]:
    return list(record.PROMOTION.get(trial) or [])


def is_paused(trial: FrozenTrial) -> bool:
    """A paused trial: waiting again after it ran (a ticket or a retry has never started)."""
    return trial.state == TrialState.WAITING and trial.datetime_start is not None


def was_paused(trial: optuna.Trial | FrozenTrial) -> bool:
    """True for a promoted trial: it continues from its own resume state."""
    return any(d["decision"] == PAUSE for d in decisions(trial))


def paused_at(trial: FrozenTrial) -> dict[str, Any] | None:
    """The ``pause`` decision a paused trial waits on: its rung, evaluation, value and η."""
    if not is_paused(trial):
        return None
    pauses = [d for d in decisions(trial) if d["decision"] == PAUSE]
    return pauses[-1] if pauses else None


def promotable(trials: list[FrozenTrial], direction: StudyDirection) -> list[FrozenTrial]:
    """The paused trials now in the top ⌊n/η⌋ of their rung: highest rung first, then best
    first (Li et al. 2020, Algorithm 2: promote from the top rung down)."""
    found: list[tuple[int, int, FrozenTrial]] = []
    by_number = {t.number: t for t in trials}
    for evaluation in sorted({int(p["evaluation"]) for t in trials if (p := paused_at(t))}, reverse=True):
        entries = rung_entries(trials, evaluation)
        for rank, number in enumerate(top(entries, _eta_at(trials, evaluation), direction)):
            pause = paused_at(by_number[number])
            if pause is not None and int(pause["evaluation"]) == evaluation:
                found.append((-evaluation, rank, by_number[number]))
    return [t for _, _, t in sorted(found, key=lambda f: (f[0], f[1]))]


def _eta_at(trials: list[FrozenTrial], evaluation: int) -> int:
    # η as the paused trials of this rung recorded it (one per study: it is a study setting).
    return next(int(p["eta"]) for t in trials if (p := paused_at(t)) and int(p["evaluation"]) == evaluation)


# --------------------------------------------------------------------------- what the objective calls


def judge(study: optuna.Study, trial: optuna.Trial, evaluation: int, value: float, *, eta: int,
          max_evaluations: int) -> None:
    """At evaluation ``evaluation`` (already reported, its resume state saved): go on, or
    record a pause and raise :class:`Paused`. Evaluations that are not rungs go on unjudged."""
    levels = rungs(max_evaluations, eta)
    if evaluation not in levels:
        return
    entries = rung_entries(study.get_trials(deepcopy=False), evaluation)  # this trial's value is in it
    if not any(e.number == trial.number for e in entries):
        entries.append(Entry(trial.number, value))
    order = [e.number for e in ordered(entries, study.direction)]
    decision = {"rung": levels.index(evaluation), "evaluation": evaluation, "value": value, "eta": eta,
                "rank": order.index(trial.number) + 1, "of": len(order), "at": round(time.time(), 3)}
    if goes_on(entries, trial.number, eta, study.direction):
        _append(trial, {"decision": PROMOTE, **decision})
        logger.info("trial %d goes on from rung %d (rank %d of %d)", trial.number, decision["rung"],
                    decision["rank"], decision["of"])
        return
    # The device time of this run so far: a paused trial is not told, so nothing else records it.
    started = budget.run_started(trial) or time.time()  # this run's start: the earlier ones are recorded
    earlier = float(record.GPU_SECONDS.get(trial, 0.0))
    record.GPU_SECONDS.set(trial, round(earlier + (time.time() - started) * float(record.DEVICES.get(trial, 1)), 3))
    _append(trial, {"decision": PAUSE, **decision})
    raise Paused(f"paused at rung {decision['rung']} (evaluation {evaluation}, rank {decision['rank']} "
                 f"of {decision['of']})")


def _append(trial: optuna.Trial, decision: dict[str, Any]) -> None:
    record.PROMOTION.set(trial, [*decisions(trial), decision])


# --------------------------------------------------------------------------- what the worker calls


def park(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Hand a paused trial's worker back: RUNNING -> WAITING. False if a reaper failed it first."""
    try:
        optuna_adapter.storage_of(study).set_trial_state_values(optuna_adapter.trial_id(trial), TrialState.WAITING)
    except optuna.exceptions.UpdateFinishedTrialError:
        logger.warning("trial %d was failed by another process before it could pause", trial.number)
        return False
    logger.info("trial %d paused", trial.number)
    return True


def promote(study: optuna.Study) -> int | None:
    """Claim the best promotable paused trial (WAITING -> RUNNING) and record its promotion;
    its trial id, or None. One light query when nothing is paused (a study of any other pruner)."""
    if not optuna_adapter.waiting_trial_ids(study, paused=True):
        return None
    trials = study.get_trials(deepcopy=False)
    for trial in promotable(trials, study.direction):
        if not _take(study, trial):
            continue  # another worker promoted it first
        pause = paused_at(trial) or {}
        live = optuna.Trial(study, optuna_adapter.trial_id(trial))
        _append(live, {"decision": PROMOTE, **{k: pause.get(k) for k in ("rung", "evaluation", "value", "eta")},
                       "resumed": True, "at": round(time.time(), 3)})
        logger.info("trial %d promoted from rung %s", trial.number, pause.get("rung"))
        return optuna_adapter.trial_id(trial)
    return None


def _take(study: optuna.Study, trial: FrozenTrial) -> bool:
    """WAITING -> RUNNING, as a claim does. Its heartbeat is renewed first: the one it left
    when it paused is old, and a reaper looking between the claim and the worker's first beat
    would take the trial for dead."""
    storage, trial_id = optuna_adapter.storage_of(study), optuna_adapter.trial_id(trial)
    liveness.renew(storage, trial_id)
    try:
        return bool(storage.set_trial_state_values(trial_id, state=TrialState.RUNNING))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def close(study: optuna.Study, release: Callable[[optuna.Trial], None] | None = None) -> list[int]:
    """At the end of the sweep (no ticket left, nothing running), tell every trial still paused
    PRUNED with its best evaluation as its value; ``release`` deletes its resume state. Returns
    their numbers. Each is claimed first, so two workers closing at once prune it once."""
    pruned = []
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        pause = paused_at(trial)
        if pause is None or not _take(study, trial):
            continue
        live = optuna.Trial(study, optuna_adapter.trial_id(trial))
        curve = trial.intermediate_values
        best_evaluation = ordered([Entry(step, v) for step, v in curve.items()], study.direction)[0].number
        _append(live, {"decision": PRUNE, **{k: pause.get(k) for k in ("rung", "evaluation", "value", "eta")},
                       "at": round(time.time(), 3)})
        record.BEST_EVALUATION.set(live, best_evaluation)
        if release is not None:
            release(live)
        storage = optuna_adapter.storage_of(study)
        storage.set_trial_state_values(optuna_adapter.trial_id(trial), TrialState.PRUNED,
                                       values=[float(curve[best_evaluation])])
        pruned.append(trial.number)
    if pruned:
        logger.info("the sweep ended with trials %s paused: pruned at their best evaluation", pruned)
    return pruned
