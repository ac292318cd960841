"""The lineage of a PBT sweep (issue 16, ``sweeper/lineage.py``): a segment's chain of parents is
its model's schedule, a failed parent's retry stands in for it, and the report draws every
segment with a dashed link from the point it started at."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeper import lineage, record, report

LR = FloatDistribution(1e-5, 1e-2, log=True)


def _segment(member: int, generation: int, parent: int | None, start: int, decision: str,
             curve: dict[int, float], state: TrialState = TrialState.COMPLETE, lr: float = 1e-3,
             retry_of: list[int] | None = None, **extra: Any) -> FrozenTrial:
    last = max(curve)
    pbt = {"member": member, "generation": generation, "parent": parent, "previous": None,
           "start_step": start * 10, "start_evaluation": start, "decision": decision, **extra}
    if state == TrialState.COMPLETE:
        pbt["end"] = {"evaluation": last, "value": curve[last], "step": last * 10, "evaluations": last}
    system: dict[str, Any] = {record.PBT.key: pbt}
    if retry_of:
        system[record.RETRY_HISTORY.key] = retry_of
    return optuna.create_trial(state=state, value=curve[last] if state == TrialState.COMPLETE else None,
                               params={"learning_rate": lr}, distributions={"learning_rate": LR},
                               intermediate_values=curve, system_attrs=system)


@pytest.fixture
def population() -> list[FrozenTrial]:
    """Two members, two evaluations a segment: member 0 exploits member 1 after generation 0;
    member 1's second segment dies and is retried as trial 4, from which trial 5 continues."""
    study = optuna.create_study(direction="maximize")
    for trial in [
        _segment(0, 0, None, 0, "start", {1: 0.5, 2: 0.6}),                                    # 0
        _segment(1, 0, None, 0, "start", {1: 0.7, 2: 0.8}, lr=2e-3),                            # 1
        _segment(0, 1, 1, 2, "exploit", {1: 0.7, 2: 0.8, 3: 0.85, 4: 0.9}, lr=2.4e-3,
                 explore={"learning_rate": {"from": 2e-3, "to": 2.4e-3, "factor": 1.2}}),        # 2
        _segment(1, 1, 1, 2, "continue", {1: 0.7, 2: 0.8, 3: 0.82}, state=TrialState.FAIL, lr=2e-3),  # 3
        _segment(1, 1, 1, 2, "continue", {1: 0.7, 2: 0.8, 3: 0.82, 4: 0.86}, lr=2e-3, retry_of=[3]),  # 4
        _segment(1, 2, 3, 4, "continue", {1: 0.7, 2: 0.8, 3: 0.82, 4: 0.86, 5: 0.87, 6: 0.88}, lr=2e-3),  # 5
    ]:
        study.add_trial(trial)
    return study.get_trials(deepcopy=False)


def test_a_segments_chain_follows_its_parents_back_to_a_first_segment(population: list[FrozenTrial]) -> None:
    assert [t.number for t in lineage.chain(population, population[2])] == [1, 2], "member 0 exploited member 1"
    assert [t.number for t in lineage.chain(population, population[0])] == [0]
    # Trial 5 names trial 3 as parent; 3 failed and its retry, 4, holds the state 5 started from.
    assert [t.number for t in lineage.chain(population, population[5])] == [1, 4, 5]


def test_the_schedule_lists_each_segments_hyperparameters_steps_and_decision(population: list[FrozenTrial]) -> None:
    schedule = lineage.schedule(population, population[2])
    assert [(s["trial"], s["decision"], s["params"]["learning_rate"]) for s in schedule] == [
        (1, "start", 2e-3), (2, "exploit", 2.4e-3)]
    assert (schedule[1]["start_step"], schedule[1]["start_evaluation"], schedule[1]["end_evaluation"]) == (20, 2, 4)
    assert schedule[1]["explore"]["learning_rate"]["factor"] == 1.2
    assert schedule[0]["value"] == 0.8 and schedule[1]["value"] == 0.9
    assert lineage.is_pbt(population) and not lineage.is_pbt([optuna.create_trial(value=1.0)])


def test_a_segments_own_curve_leaves_out_the_parents_evaluations(population: list[FrozenTrial]) -> None:
    assert lineage.own_curve(population[2]) == [(3, 0.85), (4, 0.9)]
    assert lineage.own_curve(population[0]) == [(1, 0.5), (2, 0.6)]


def test_the_report_draws_each_segment_and_a_dashed_link_from_where_it_started(population: list[FrozenTrial]) -> None:
    pytest.importorskip("plotly")  # the report extra; the test extra installs it
    fig = report._lineage(population, "validation accuracy")
    solid = [d for d in fig.data if d.line.dash != "dash"]
    dashed = [d for d in fig.data if d.line.dash == "dash"]
    assert len(solid) == 5, "every segment but the failed one"
    assert len(dashed) == 3, "trials 2, 4 and 5 started from a parent"
    exploit = next(d for d in dashed if tuple(d.y) == (0.8, 0.85))
    assert tuple(exploit.x) == (2, 3)
    colours = {d.hovertext.split(",")[1].strip(): d.line.color for d in solid}
    assert colours["member 0"] != colours["member 1"]
    with pytest.raises(report.CannotDraw):
        report._lineage([population[3]], "validation accuracy")
