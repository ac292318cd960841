"""``scheduler="pbt"``: population-based training (Jaderberg et al. 2017, "Population Based
Training of Neural Networks"; the defaults are Ray Tune's ``PopulationBasedTraining``).

What a sweep of it is, in Optuna's terms, so that the dashboard, ``sweeper status`` and
``optuna.load_study`` see an ordinary study:

- A *member* trains one model over a whole run (``epochs``), in *segments* of
  ``perturbation_interval`` evaluations (the last one may be shorter). Each segment is an
  ordinary Optuna trial with the segment's hyperparameters as its parameters. The first
  segments are the first ``population`` tickets of the budget; a member's id is the number of
  its first trial.
- A segment after the first starts from its *parent*'s resume state (weights, AdamW moments,
  scheduler position, evaluation history: ``finetune.loop.TrainState``), at the parent's step,
  with its own hyperparameters (the loop gives the optimizer the segment's learning rate,
  weight decay and β₂ on that state). It reports the parent's evaluations first, so each
  segment's curve is the whole curve of the weights it trains, and it trains with its member's
  seed, so a member that always continues trains bit for bit as one uninterrupted trial.
- A segment's value is its *last* evaluation, not its best: that is the model it hands on, and
  its model checkpoint (``sweeper best`` then picks the best segment and gets the member's
  model at that point). PBT never prunes: the pruner is not consulted.
- When a segment ends, it is ranked among the segments of the population that ended at the
  *same evaluation* (each member's latest there; a tie goes to the earlier trial). Ranking
  segments at different evaluations would rank training progress, not hyperparameters (a
  member that started later always looks worse), and it keeps every member at exactly
  ⌈evaluations / perturbation_interval⌉ segments. With n ranked, the top and the bottom
  ⌈n·quantile⌉ (at most ⌊n/2⌋) are the quantiles (Ray Tune's rule): alone, or with too few
  peers yet, a segment is in neither.
- In the bottom quantile, its member's next segment *exploits*: it starts from the state of a
  top-quantile segment drawn at random (the *donor*) and *explores* from the donor's
  hyperparameters: each continuous one is drawn afresh from the space with
  ``resample_probability``, else multiplied by one of ``perturbation_factors`` drawn at random
  and clipped to its range (a categorical one moves to a neighbouring choice). Otherwise its
  next segment *continues* from its own state with its hyperparameters unchanged.
- Structural values (``unfreeze_depth``, ``batch_size``) are never perturbed: the resume
  state holds exactly the parameters a depth trains, and the batch size sets the step count
  the state is at. A segment copies them from its parent, so an exploiting member takes the
  donor's structure with its weights.
- The next segment is a WAITING trial with fixed parameters (as a retry is), added while the
  budget allows, under the ticket lock (``budget.ticket_lock``): no more trials than
  ``n_trials`` across workers, on SQLite and PostgreSQL. The budget is segments in all:
  ``population`` × segments per member (the study check refuses one beyond that).
- Every segment records ``sweeper:pbt`` (docs/records.md): member, generation, parent,
  previous (its member's segment before it), start step and evaluation, the decision (start,
  continue, exploit with the rank it had, the explore changes), and ``end`` once it ended. A
  retry keeps it and resumes as any retry does, from its own resume state or, if it saved
  none, from its parent's.
- A resume state is kept while a segment may still start from it: a waiting or running trial
  names it as parent or in its retry history, or a member has yet to reach the evaluation it
  ended at (it may be drawn as a donor there). The others are deleted when a segment ends,
  so a sweep holds about a generation or two of states, not all of them.

The arithmetic (:func:`quantile_size`, :func:`quantiles`, :func:`perturb`, :func:`resample`,
:func:`explore`) is pure; :func:`begin`, :func:`end_segment` and :func:`release` are called by
the objective.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, optuna_adapter, record
from sweeper import space as space_mod

if TYPE_CHECKING:
    from sweeper.finetune.loop import LoopResult
    from sweeper.study import Sweep

logger = logging.getLogger(__name__)

STRUCTURAL = ("unfreeze_depth", "batch_size")  # copied from the parent, never perturbed
START, CONTINUE, EXPLOIT = "start", "continue", "exploit"
RESAMPLE = "resample"


class SegmentEnded(Exception):
    """Raised from a segment's last evaluation, once its state is saved and its member's next
    segment queued: the trial ends there, with ``result`` (its value: that evaluation)."""

    def __init__(self, result: LoopResult) -> None:
        super().__init__(f"segment ended at evaluation {result.best_evaluation}")
        self.result = result


# --------------------------------------------------------------------------- the arithmetic


def quantile_size(n: int, quantile: float) -> int:
    """Members in each of the top and the bottom quantile of ``n`` ranked: ⌈n·quantile⌉, but
    ⌊n/2⌋ where that is more, so that none is in both (Ray Tune's rule)."""
    size = math.ceil(n * quantile)
    return n // 2 if size > n / 2 else size


@dataclass(frozen=True)
class Entry:
    """One segment's value where it ended."""

    number: int  # the segment's trial
    member: int
    value: float


def ordered(entries: Iterable[Entry], direction: StudyDirection) -> list[Entry]:
    """Best first; a tie goes to the earlier trial (as ``record.ranked`` ranks)."""
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    return sorted(entries, key=lambda e: (sign * e.value, e.number))


def quantiles(entries: Iterable[Entry], quantile: float, direction: StudyDirection) -> tuple[list[Entry], list[Entry]]:
    """The top and the bottom quantile of ``entries``, each best first."""
    order = ordered(entries, direction)
    size = quantile_size(len(order), quantile)
    return order[:size], order[len(order) - size:] if size else []


def perturb(value: float, dist: space_mod.Distribution, factor: float) -> Any:
    """``value`` × ``factor``, clipped to ``dist``'s range and put on its grid (an ``Int``, a
    ``Float`` with a step)."""
    moved = value * factor
    if isinstance(dist, space_mod.Int):
        last = dist.high - (dist.high - dist.low) % dist.step
        return int(min(max(dist.low + round((moved - dist.low) / dist.step) * dist.step, dist.low), last))
    if isinstance(dist, space_mod.Float) and dist.step:
        steps = math.floor((dist.high - dist.low) / dist.step + 1e-9)
        return dist.low + min(max(round((moved - dist.low) / dist.step), 0), steps) * dist.step
    if isinstance(dist, (space_mod.Float, space_mod.LogFloat)):
        return min(max(moved, dist.low), dist.high)
    raise TypeError(f"{dist} is not a range: a categorical value moves to a neighbour instead")


def resample(dist: space_mod.Distribution, rng: random.Random) -> Any:
    """A fresh draw from ``dist``, as the sampler's prior would make it."""
    if isinstance(dist, space_mod.LogFloat):
        return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
    if isinstance(dist, space_mod.Float):
        if dist.step:
            return dist.low + rng.randint(0, math.floor((dist.high - dist.low) / dist.step + 1e-9)) * dist.step
        return rng.uniform(dist.low, dist.high)
    if isinstance(dist, space_mod.Int):
        return rng.randrange(dist.low, dist.high + 1, dist.step)
    return rng.choice(list(dist.choices))


def neighbour(value: Any, dist: space_mod.Categorical, rng: random.Random) -> Any:
    """The choice one place before or after ``value`` (drawn), kept at the ends (Ray Tune's)."""
    choices = list(dist.choices)
    index = choices.index(value) if value in choices else 0
    return choices[min(max(index + rng.choice((-1, 1)), 0), len(choices) - 1)]


def explore(params: dict[str, Any], space: dict[str, Any], rng: random.Random, resample_probability: float,
            factors: Sequence[float]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The hyperparameters an exploiting segment trains with, from its donor's ``params``, and
    what changed: ``{name: {from, to, by}}``, ``by`` the factor, ``"resample"`` or the step
    (±1) to a neighbouring choice. Structural values and constants stay. In the space's order,
    so that one ``rng`` gives one result."""
    explored = dict(params)
    changes: dict[str, dict[str, Any]] = {}
    for name, dist in space.items():
        if name in STRUCTURAL or not space_mod.is_distribution(dist) or name not in params:
            continue
        old = params[name]
        by: Any
        if rng.random() < resample_probability:
            new, by = resample(dist, rng), RESAMPLE
        elif isinstance(dist, space_mod.Categorical):
            new = neighbour(old, dist, rng)
            by = 0 if new == old else (1 if list(dist.choices).index(new) > list(dist.choices).index(old) else -1)
        else:
            by = rng.choice(list(factors))
            new = perturb(old, dist, by)
        explored[name] = new
        changes[name] = {"from": old, "to": new, "by": by}
    return explored, changes


def ends_at(evaluation: int, segment: dict[str, Any], interval: int, planned: int) -> bool:
    """Whether ``evaluation`` is the last of ``segment``: ``interval`` evaluations after it
    started, or the last evaluation of the run (``planned``)."""
    return evaluation >= min(int(segment["start_evaluation"]) + interval, planned)


# --------------------------------------------------------------------------- a segment's record


def segment_of(trial: optuna.Trial | FrozenTrial) -> dict[str, Any] | None:
    return record.PBT.get(trial)


def begin(trial: optuna.Trial, history: list[int]) -> dict[str, Any]:
    """The record of ``trial``'s segment. A first segment gets its record here, when it starts
    (a ticket has none): its member is the first trial of its retry lineage."""
    segment = segment_of(trial)
    if segment:
        return dict(segment)
    segment = {"member": history[0] if history else trial.number, "generation": 0, "parent": None,
               "previous": None, "start_step": 0, "start_evaluation": 0, "decision": START,
               "at": round(time.time(), 3)}
    record.PBT.set(trial, segment)
    return segment


def for_retry(segment: dict[str, Any]) -> dict[str, Any]:
    """What a retry of a segment keeps of its record: everything but its end, which the retry
    reaches again itself."""
    return {key: value for key, value in segment.items() if key != "end"}


def _end(trial: FrozenTrial) -> dict[str, Any] | None:
    segment = segment_of(trial) or {}
    return segment.get("end")


# --------------------------------------------------------------------------- what the objective calls


def end_segment(study: optuna.Study, trial: optuna.Trial, sweep: Sweep, *, evaluation: int, value: float,
                step: int, planned: int) -> dict[str, Any] | None:
    """At the last evaluation of ``trial``'s segment (its resume state saved): record its end,
    rank it, and queue its member's next segment while the run and the budget go on. Returns
    that segment's record, or None."""
    segment = dict(segment_of(trial) or {})
    record.PBT.set(trial, {**segment, "end": {"evaluation": evaluation, "value": value, "step": step,
                                              "evaluations": planned}})
    if evaluation >= planned:
        logger.info("member %s finished its run with trial %d (%s)", segment["member"], trial.number, value)
        return None
    # Adding a trial is not repeated by the storage (a lost answer would add two); looking
    # for this segment's successor first makes the whole of it safe to repeat.
    return optuna_adapter.call_with_retries(
        lambda: _queue_next(study, trial, sweep, segment, evaluation, value, step), what="queueing a PBT segment")


def _queue_next(study: optuna.Study, trial: optuna.Trial, sweep: Sweep, segment: dict[str, Any],
                evaluation: int, value: float, step: int) -> dict[str, Any] | None:
    member, generation = int(segment["member"]), int(segment["generation"]) + 1
    with budget.ticket_lock(study) as still_held:  # count and add under one lock, as the tickets are
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            found = segment_of(t) or {}
            if (found.get("member"), found.get("generation")) == (member, generation):
                return dict(found)  # queued already (a repeat, or a retry of this segment)
        allowed = record.N_TRIALS.get(study)
        if allowed is not None and budget.tally(trials).spent >= int(allowed):
            logger.info("member %d ends with trial %d: the budget of %s segments is spent", member, trial.number,
                        allowed)
            return None
        entries = ranked_at(trials, evaluation, Entry(trial.number, member, value))
        top, bottom = quantiles(entries, sweep.quantile, study.direction)
        by_number = {t.number: t for t in trials}
        donors = [by_number[e.number] for e in top if _can_donate(by_number.get(e.number), evaluation)]
        rank = [e.number for e in ordered(entries, study.direction)].index(trial.number) + 1
        # One draw per member and generation: a retry of this segment decides as it did.
        rng = random.Random(f"{sweep.seed}:pbt:{member}:{generation}")
        decision: dict[str, Any] = {"rank": rank, "of": len(entries), "value": value}
        if any(e.number == trial.number for e in bottom) and donors:
            donor = rng.choice(donors)
            params, changes = explore(donor.params, sweep.space, rng, sweep.resample_probability,
                                      sweep.perturbation_factors)
            distributions = donor.distributions
            parent, start_step = donor.number, int(_end(donor)["step"])  # type: ignore[index]
            decision.update(decision=EXPLOIT, explore=changes)
        else:
            params, distributions, parent, start_step = trial.params, trial.distributions, trial.number, step
            decision.update(decision=CONTINUE)
        successor = {"member": member, "generation": generation, "parent": parent, "previous": trial.number,
                     "start_step": start_step, "start_evaluation": evaluation, **decision,
                     "at": round(time.time(), 3)}
        still_held()  # a lock lost with its connection: stop, and count again under a new one
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=params,
                                                  distributions=distributions,
                                                  system_attrs={record.PBT.key: successor}))
    if successor["decision"] == EXPLOIT:
        logger.info("member %d (trial %d, rank %d of %d) exploits trial %d: %s", member, trial.number, rank,
                    len(entries), parent, {k: (c["from"], c["to"]) for k, c in successor["explore"].items()})
    else:
        logger.info("member %d (trial %d, rank %d of %d) continues", member, trial.number, rank, len(entries))
    return successor


def ranked_at(trials: Iterable[FrozenTrial], evaluation: int, current: Entry) -> list[Entry]:
    """The segments that ended at ``evaluation``, each member's latest there, ``current`` in
    place of any earlier one of its member (a failed attempt that its retry repeats)."""
    latest: dict[int, Entry] = {}
    for t in trials:
        end, segment = _end(t), segment_of(t) or {}
        if end is None or int(end["evaluation"]) != evaluation or t.state == TrialState.WAITING:
            continue
        entry = Entry(t.number, int(segment["member"]), float(end["value"]))
        if entry.member not in latest or entry.number > latest[entry.member].number:
            latest[entry.member] = entry
    latest[current.member] = current
    return list(latest.values())


def _can_donate(trial: FrozenTrial | None, evaluation: int) -> bool:
    """A donor has a resume state there and training left after it."""
    end = _end(trial) if trial is not None else None
    return (trial is not None and end is not None and bool(record.RESUME.get(trial))
            and int(end["evaluation"]) == evaluation and int(end["evaluations"]) > evaluation)


def release(study: optuna.Study, store: Any, trial: optuna.Trial) -> list[int]:
    """Delete the resume states that no segment can start from any more, ``trial``'s own among
    them (it is ending: told next). Returns the trials whose state went.

    A state is kept while a waiting or running trial names its trial as parent or in its
    retry history, or while one that started before the evaluation it ended at is still to
    come (that member may draw it as a donor there; a ticket not yet started counts, from 0).
    Finished trials keep their record of a deleted state (Optuna freezes them): deleting
    again is a no-op."""
    from sweeper import checkpoints  # torch: not for the worker loop's import (RetryCallback reads this module)

    trials = study.get_trials(deepcopy=False)
    live = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING) and t.number != trial.number]
    needed: set[int] = set()
    for t in live:
        parent = (segment_of(t) or {}).get("parent")
        if parent is not None:
            needed.add(int(parent))
        needed.update(int(n) for n in record.RETRY_HISTORY.get(t, []))
    earliest = min((int((segment_of(t) or {}).get("start_evaluation", 0)) for t in live), default=None)
    removed = []
    for t in trials:
        info = record.RESUME.get(t)
        if not info or t.number in needed or (t.state == TrialState.RUNNING and t.number != trial.number) \
                or t.state == TrialState.WAITING:
            continue
        end = _end(t)
        if end is not None and earliest is not None and earliest < int(end["evaluation"]):
            continue
        if checkpoints.remove_quietly(store, info["id"]):
            removed.append(t.number)
    if trial.number in removed:
        try:
            record.RESUME.set(trial, None)
        except Exception as exc:  # noqa: BLE001  (finished by another process already: the record just stays)
            logger.debug("trial %d: resume record not cleared (%s)", trial.number, exc)
    if removed:
        logger.debug("PBT released the resume states of trials %s", removed)
    return removed
