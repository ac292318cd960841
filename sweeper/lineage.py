"""The lineage of a ``scheduler="pbt"`` sweep (issue 16): which segment started from which, and
the schedule of hyperparameters that made a model.

Every segment records ``sweeper:pbt`` (``pbt.py``): its member, generation, *parent* (the trial
whose resume state it started from: its member's previous segment, or the top-quantile donor
it exploited) and the evaluation it started at. Following parents from a segment back to a
first segment gives the exact sequence of trainings its weights went through: its *schedule*
(the hyperparameters of each segment, from which step, and why), which ``sweeper best``
writes as ``schedule.json`` beside the model, and the report draws for the whole population.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from sweeper import record


def segment(trial: FrozenTrial) -> dict[str, Any] | None:
    """``trial``'s PBT record; None for a trial of any other scheduler."""
    found = record.PBT.get(trial)
    return found if isinstance(found, dict) else None


def is_pbt(trials: Sequence[FrozenTrial]) -> bool:
    return any(segment(t) is not None for t in trials)


def latest(trials: Sequence[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Each trial number's latest attempt: a failed segment's retry stands in for it."""
    by_number = {t.number: t for t in trials}
    for t in trials:
        for replaced in record.RETRY_HISTORY.get(t, []) or []:
            if t.state != TrialState.FAIL:
                by_number[int(replaced)] = t
    return by_number


def chain(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> list[FrozenTrial]:
    """The segments ``trial``'s weights went through, first segment first, ending at ``trial``."""
    by_number = latest(trials)
    path, seen = [trial], {trial.number}
    while (parent := (segment(path[-1]) or {}).get("parent")) is not None:
        if int(parent) in seen or int(parent) not in by_number:
            break  # a record that points nowhere (or in a circle) ends the chain rather than the report
        seen.add(int(parent))
        path.append(by_number[int(parent)])
    return path[::-1]


def schedule(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> list[dict[str, Any]]:
    """``trial``'s schedule: one entry per segment of its chain, oldest first."""
    entries = []
    for t in chain(trials, trial):
        seg = segment(t) or {}
        end = seg.get("end") or {}
        entry = {"trial": t.number, "member": seg.get("member"), "generation": seg.get("generation"),
                 "start_step": seg.get("start_step"), "start_evaluation": seg.get("start_evaluation"),
                 "end_step": end.get("step"), "end_evaluation": end.get("evaluation"), "value": end.get("value"),
                 "decision": seg.get("decision"), "parent": seg.get("parent"), "params": dict(t.params)}
        if seg.get("explore"):
            entry["explore"] = seg["explore"]
        entries.append(entry)
    return entries


def own_curve(trial: FrozenTrial) -> list[tuple[int, float]]:
    """The evaluations ``trial`` itself made: its intermediate values after the evaluation it
    started at (a segment reports its parent's first, so the whole curve is in each)."""
    start = int((segment(trial) or {}).get("start_evaluation") or 0)
    return sorted((int(k), float(v)) for k, v in trial.intermediate_values.items() if int(k) > start)
