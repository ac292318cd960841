"""How trial arrays spread over structures (issue 21, ``sweeper/array_structure.py``): every
structure of the grid gets one array's worth of trials before the sampler chooses, counted from
the study's trials (drawn parameters, or the values a claim fixed), and a claim fixes a structure
on fresh tickets only."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from sweeper import array_structure, record, worker
from sweeper.array_structure import MAX_GRID, StructurePlan, fresh
from sweeper.space import Categorical, Int, LogFloat

SPACE: dict[str, Any] = {"learning_rate": LogFloat(1e-4, 1e-2), "unfreeze_depth": Int(1, 2),
                         "batch_size": Categorical([16, 32])}


def _trial(depth: int | None, batch: int | None = 16, state: TrialState = TrialState.COMPLETE,
           fixed: dict[str, Any] | None = None) -> FrozenTrial:
    params: dict[str, Any] = {} if depth is None else {"unfreeze_depth": depth, "batch_size": batch,
                                                       "learning_rate": 1e-3}
    distributions = {} if depth is None else {"unfreeze_depth": IntDistribution(1, 2),
                                               "batch_size": CategoricalDistribution([16, 32]),
                                               "learning_rate": FloatDistribution(1e-4, 1e-2, log=True)}
    system = {record.FIXED_PARAMS.key: fixed} if fixed else {}
    values = None if state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL) else [0.5]
    return create_trial(state=state, params=params, distributions=distributions, values=values,
                        system_attrs=system)


def test_the_grid_holds_every_structure_in_an_order_the_seed_decides() -> None:
    plan = StructurePlan.of(SPACE, array_size=4, n_trials=64, seed=0)
    assert plan is not None and plan.names == ("unfreeze_depth", "batch_size")
    assert sorted(plan.grid) == [(1, 16), (1, 32), (2, 16), (2, 32)]
    assert plan.grid == StructurePlan.of(SPACE, 4, 64, seed=0).grid  # type: ignore[union-attr]
    orders = {StructurePlan.of(SPACE, 4, 64, seed=s).grid for s in range(8)}  # type: ignore[union-attr]
    assert len(orders) > 1, "the study seed shuffles the order: no structure always goes first"


def test_nothing_to_spread_leaves_the_sampler_every_choice() -> None:
    assert StructurePlan.of({**SPACE, "unfreeze_depth": 2, "batch_size": 32}, 4, 64, 0) is None
    assert StructurePlan.of({**SPACE, "unfreeze_depth": Int(1, 1), "batch_size": 32}, 4, 64, 0) is None
    wide = {**SPACE, "unfreeze_depth": Int(0, MAX_GRID), "batch_size": 32}
    assert StructurePlan.of(wide, 4, 64, 0) is None


def test_new_arrays_start_at_untried_structures_then_the_sampler_proposes() -> None:
    plan = StructurePlan.of(SPACE, array_size=2, n_trials=40, seed=3)
    assert plan is not None
    first, second = plan.grid[0], plan.grid[1]
    assert plan.first([]) == dict(zip(plan.names, first, strict=True))
    # A claimed first member whose parameters are not drawn yet counts by what its claim fixed,
    # so a second worker starting an array at the same time takes another structure.
    claimed = _trial(None, state=TrialState.RUNNING, fixed=dict(zip(plan.names, first, strict=True)))
    assert plan.first([claimed]) == dict(zip(plan.names, second, strict=True))
    everything = [_trial(*structure) for structure in plan.grid]
    assert plan.first(everything) is None, "every structure tried: the sampler chooses"


def test_exploration_ends_at_half_the_budget_and_failed_trials_do_not_count() -> None:
    plan = StructurePlan.of(SPACE, array_size=2, n_trials=8, seed=0)
    assert plan is not None
    one = plan.grid[0]
    assert plan.first([_trial(*one)] * 3) is not None  # 3 of 8 spent: still exploring
    assert plan.first([_trial(*one)] * 4) is None, "half the budget spent: the sampler takes over"
    failed = [_trial(*one, state=TrialState.FAIL)] * 5
    assert plan.tried(failed)[one] == 0 and plan.first(failed) is not None


def test_an_exploring_array_takes_one_arrays_worth_of_its_structure() -> None:
    plan = StructurePlan.of(SPACE, array_size=3, n_trials=64, seed=0)
    assert plan is not None
    fixed = {"unfreeze_depth": 1, "batch_size": 32}
    assert plan.may_join([_trial(1, 32), _trial(1, 32), _trial(2, 32)], fixed)
    assert not plan.may_join([_trial(1, 32)] * 3, fixed)


def test_a_claim_fixes_a_structure_on_a_fresh_ticket_only(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'db'}")
    retry = _trial(2, 32, state=TrialState.WAITING)
    retry.system_attrs[record.RETRY_HISTORY.key] = [0]
    study.add_trial(retry)
    study.enqueue_trial({})  # a fresh ticket
    fixed = {"unfreeze_depth": 1, "batch_size": 16}
    first = worker.claim(study, fixed=fixed)
    assert first is not None and not fresh(first)
    assert record.FIXED_PARAMS.get(study.trials[0], {}) in ({}, None), "a retry keeps its own parameters"
    second = worker.claim(study, fixed=fixed)
    assert second is not None
    assert record.FIXED_PARAMS.get(study.trials[1]) == fixed
    assert second.suggest_int("unfreeze_depth", 1, 2) == 1


def test_two_workers_starting_arrays_at_once_take_different_structures(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The choice is read and claimed under the ticket lock. A slow read (the sleep below)
    makes the race certain without it: both workers would read the grid untried and take its
    first structure."""
    plan = StructurePlan.of(SPACE, array_size=2, n_trials=40, seed=0)
    assert plan is not None
    choose = StructurePlan.first

    def slow_first(self: StructurePlan, trials: Any) -> dict[str, Any] | None:
        chosen = choose(self, list(trials))
        time.sleep(0.3)  # between the read and the claim that records it
        return chosen

    monkeypatch.setattr(StructurePlan, "first", slow_first)
    url = f"sqlite:///{tmp_path / 'db'}"
    optuna.create_study(study_name="race", storage=url)
    seed_study = optuna.load_study(study_name="race", storage=url)
    for _ in range(4):
        seed_study.enqueue_trial({})
    start, taken = threading.Barrier(2), []

    def start_an_array() -> None:
        study = optuna.load_study(study_name="race", storage=url)  # each worker its own storage
        start.wait()
        taken.append(array_structure.claim_first(study, plan, worker.claim))

    threads = [threading.Thread(target=start_an_array) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(taken) == 2 and all(trial is not None for trial, _ in taken)
    structures = [plan.structure(fixed or {}) for _, fixed in taken]
    assert None not in structures and structures[0] != structures[1], structures
    assert {trial.number for trial, _ in taken if trial is not None} == {0, 1}
