"""A worker's trial array (issue 21): up to ``array_size`` claimed trials trained as one model.

The worker claims a ticket as ever; when the study's ``array_size`` is above 1 and the ticket is
a fresh trial, that trial becomes the first member of a :class:`~sweeper.finetune.arrays.TrialArray`
and the worker claims more tickets to fill it. Each member stays an ordinary Optuna trial: its
own claim, intermediate values, pruning, value, checkpoint, resume state and timings, told to
Optuna the moment it leaves the array.

Choices this module makes, and why:

- *Structure.* An array's structure (unfreeze depth and batch size, where the space searches
  them) is its first member's: fixed by ``array_structure.StructurePlan`` to a structure no
  trial has tried yet while there is one (and the array then takes one array's worth of trials
  of it), afterwards proposed by the sampler with the rest of the first member. It is fixed on
  every ticket that joins (Optuna's ``fixed_params``, as ``enqueue_trial`` does), and the
  sampler proposes the rest of each. A ticket that an earlier choice already fixed to another
  structure is left for another array or a trial alone. ``bench/array_search.py`` measures
  what this does to the search against independent proposals on the same budget.
- *Who joins.* Fresh tickets only. A retry continues its own resume state, and a seed trial of
  ``sweeper best --seeds`` trains with a seed of its own: both train alone, as before.
- *Staying full.* Before every step the array asks for a member while it holds fewer than its
  size: a pruned or finished member's row is dropped and the next ticket joins at the array's
  current position, seeing its batches from there (``record.ARRAY`` keeps the place, so a
  retry alone sees the same batches). Once the queue has no ticket for it, the array runs
  down as its members leave.
- *Device-seconds.* Each member is charged its share of every step and evaluation it was part
  of (the array splits each evenly), so a sweep's device-hours are the array's, not K times.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper import array_structure, budget, liveness, optuna_adapter, record
from sweeper.array_structure import StructurePlan, fresh, structural
from sweeper.errors import SweepError
from sweeper.finetune import array_memory
from sweeper.finetune.arrays import Member, MemberOutcome, Structure, TrialArray
from sweeper.objective import Objective, PreparedTrial, trial_seed
from sweeper.outcome import Outcome

logger = logging.getLogger(__name__)

Tell = Callable[[optuna.Trial, Outcome], None]


def can_join(ticket: FrozenTrial, fixed: dict[str, Any]) -> bool:
    """``ticket`` is fresh and fixes no structural value other than the array's."""
    if not fresh(ticket):
        return False
    own = record.FIXED_PARAMS.get(ticket, {}) or {}
    return all(own.get(name, value) == value for name, value in fixed.items())


class ArrayRunner:
    """Runs a claimed trial, as the first member of an array when it may be one (see the
    module's docstring); the worker's ``serve`` calls it as it calls ``Objective.run``."""

    def __init__(self, objective: Objective, study: optuna.Study, size: int, tell: Tell,
                 stop: threading.Event, heartbeat_interval: float,
                 claim: Callable[..., optuna.Trial | None]) -> None:
        self.objective, self.study, self.size, self.tell = objective, study, size, tell
        self.stop, self.heartbeat_interval, self.claim = stop, heartbeat_interval, claim
        self.alone_only: str | None = None  # why this model cannot be stacked, once found
        self._members: dict[int, tuple[optuna.Trial, PreparedTrial, float]] = {}
        self._first_outcome: Outcome | None = None
        sweep = objective.sweep
        self.plan = StructurePlan.of(sweep.space, size, sweep.n_trials, sweep.seed)
        self._exploring = False  # the array now starting explores a structure the plan chose

    def claim_first(self, study: optuna.Study) -> optuna.Trial | None:
        """The worker's next ticket; a fresh one gets the structure the plan has for a new
        array (none: the sampler proposes it)."""
        if self.plan is None or self.alone_only:
            trial, fixed = self.claim(study), None
        else:
            trial, fixed = array_structure.claim_first(study, self.plan, self.claim)
        self._exploring = fixed is not None and trial is not None and fresh(trial)
        return trial

    def __call__(self, trial: optuna.Trial) -> Outcome:
        if self.alone_only or not fresh(trial):
            return self.objective.run(trial)
        self._first_outcome = None
        storage = optuna_adapter.storage_of(self.study)
        with liveness.Heartbeat(storage, None, self.heartbeat_interval) as beat:
            array, first = self._start(trial)
            if array is None:
                return first  # told how it ended, or to be run alone
            fixed = {name: first.params[name] for name in structural(self.objective.sweep.space)}
            capacity = self._capacity(first)
            try:
                array.run(refill=lambda: self._refill(array, fixed, capacity, beat), capacity=capacity,
                          on_leave=lambda left: self._leave(left, beat))
                logger.info("the array of trial %d ended: %d steps, %.2f members a step on average, of %d",
                            trial.number, array.position, array.member_steps / max(1, array.position), capacity)
            except Exception as exc:  # the array itself failed (out of memory, a bug): each member ends with it
                logger.error("the trial array failed", exc_info=exc)
                for number in list(self._members):
                    self._end(number, exc, beat)
        assert self._first_outcome is not None  # the first member left, as every member does
        return self._first_outcome

    # ------------------------------------------------------------------ members

    def _start(self, trial: optuna.Trial) -> tuple[TrialArray | None, Any]:
        """The array with ``trial`` as its first member; (None, outcome) if it ended before
        (told), or (None, outcome of training it alone) when this model cannot be stacked."""
        self.first_number = trial.number
        self.batch_seed = trial_seed(self.objective.sweep.seed, trial.number)  # the first member's own order
        prepared = self._prepare(trial, position=0, share=1.0 / self.size)
        if prepared is None:
            assert self._first_outcome is not None
            return None, self._first_outcome
        array_settings = replace(prepared.settings, seed=self.batch_seed, batch_seed=None, batch_start=0)
        structure = Structure.of(prepared.hyper, prepared.adapter.num_blocks)
        try:
            array = TrialArray(self.objective.data(), array_settings, structure)
            array.add(self._member(trial, prepared))
        except SweepError as exc:  # not a model arrays can stack: every trial of this worker trains alone
            self.alone_only = str(exc)
            logger.warning("array_size ignored: %s; training trials one at a time", exc)
            del self._members[trial.number]
            record.ARRAY.set(trial, None)  # type: ignore[arg-type]
            return None, self.objective.run(trial)
        return array, prepared

    def _capacity(self, first: PreparedTrial) -> int:
        sweep = self.objective.sweep
        depth = first.adapter.num_blocks if first.hyper.unfreeze_depth is None else first.hyper.unfreeze_depth
        # A text model's longest sequence, or an image model's side (what the activations scale with).
        side: Any = getattr(sweep.data, "max_length", None) or getattr(sweep.data, "image_size", 224)
        max_length = int(side)
        return array_memory.fit_array_size(self.size, first.adapter, depth, first.hyper.batch_size, max_length,
                                           self.objective.device)

    def _prepare(self, trial: optuna.Trial, position: int, share: float) -> PreparedTrial | None:
        """What ``trial`` trains with as a member at array ``position``; None if it could
        not start (it is told how it ended)."""
        place = {"first": self.first_number, "batch_seed": self.batch_seed, "batch_start": position,
                 "size": self.size}
        joined = time.time()
        try:
            self.objective.mark_device(trial, devices=share)
            record.ARRAY.set(trial, place)  # before any resume state: a retry alone needs the place
            prepared = self.objective.prepare(trial, place)
        except Exception as exc:
            outcome = self.objective.ended(trial, exc, lambda reason: self.objective._finish(
                trial, joined, reason=reason, timings={}, device_seconds=0.0))
            self._told(trial, outcome)
            return None
        self._members[trial.number] = (trial, prepared, joined)
        return prepared

    def _member(self, trial: optuna.Trial, prepared: PreparedTrial) -> Member:
        return Member(trial.number, prepared.adapter, prepared.hyper, prepared.seed, prepared.hooks)

    def _refill(self, array: TrialArray, fixed: dict[str, Any], capacity: int,
                beat: liveness.Heartbeat) -> Member | None:
        """The next member for ``array``: a fresh ticket with the array's structure, claimed
        now; None when there is none (or the sweep must stop starting trials)."""
        if self._exploring and self.plan and not self.plan.may_join(self.study.get_trials(deepcopy=False), fixed):
            logger.info("the array of %s takes no more members: the structure has its share while others are "
                        "untried", fixed)
            return None  # the array runs down; the next starts at an untried structure
        while not self.stop.is_set() and not budget.out_of_time(self.study):
            trial = self.claim(self.study, accept=lambda t: can_join(t, fixed), fixed=fixed)
            if trial is None:
                return None
            try:
                liveness.mark_owner(trial)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # a reaper took it between the claim and this write: its retry is queued
            beat.add(optuna_adapter.trial_id(trial))
            logger.info("trial %d joins the array at step %d", trial.number, array.position)
            prepared = self._prepare(trial, array.position, share=1.0 / capacity)
            if prepared is None:
                beat.discard(optuna_adapter.trial_id(trial))
                continue
            return self._member(trial, prepared)
        return None

    def _leave(self, left: MemberOutcome, beat: liveness.Heartbeat) -> None:
        """Tell the trial of a member that left the array how it ended, at once."""
        number = int(left.member.key)  # type: ignore[call-overload]
        if left.error is not None:
            self._end(number, left.error, beat, left.device_seconds)
            return
        trial, prepared, joined = self._members.pop(number)
        assert left.result is not None
        try:
            value = self.objective.conclude(trial, prepared, left.result)
        except Exception as exc:  # saving its checkpoint failed (a full disk): this member only
            self._ended(trial, prepared, joined, exc, beat, left.device_seconds)
            return
        self.objective._finish(trial, joined, ended_early=False, device_seconds=left.device_seconds)
        self._told(trial, Outcome(TrialState.COMPLETE, value=value))
        beat.discard(optuna_adapter.trial_id(trial))

    def _end(self, number: int, exc: BaseException, beat: liveness.Heartbeat, seconds: float | None = None) -> None:
        self._ended(*self._members.pop(number), exc, beat, seconds)

    def _ended(self, trial: optuna.Trial, prepared: PreparedTrial, joined: float, exc: BaseException,
               beat: liveness.Heartbeat, seconds: float | None) -> None:
        """Tell ``trial``, which left the array by ``exc``, how it ended."""
        spent = time.time() - joined if seconds is None else seconds
        outcome = self.objective.ended(trial, exc, lambda reason: self.objective._finish(
            trial, joined, reason=reason, timings=prepared.hooks.timings, device_seconds=spent))
        self._told(trial, outcome)
        beat.discard(optuna_adapter.trial_id(trial))

    def _told(self, trial: optuna.Trial, outcome: Outcome) -> None:
        self.tell(trial, outcome)
        if trial.number == self.first_number:
            outcome.told = True
            self._first_outcome = outcome
