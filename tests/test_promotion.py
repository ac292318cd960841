"""``pruner="asha"``: the rung arithmetic against hand-computed cases, a paused trial as Optuna
and the reapers see it, a promoted trial continuing bit for bit, and exact budgets with real
worker processes (``sweeper/promotion.py``)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, checkpoints, liveness, optuna_adapter, promotion, record
from sweeper.objective import Objective
from sweeper.outcome import WorkerInfo
from sweeper.storage import open_storage
from sweeper.study import load as load_sweep
from sweeper.worker import RetryCallback, _tell, claim
from tests.helpers import run_cli, write_study

MAX, MIN = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE

# --------------------------------------------------------------------------- the rung arithmetic


def test_rungs_are_powers_of_eta_below_the_last_evaluation() -> None:
    assert promotion.rungs(9, 3) == [1, 3]  # 9 is the end of a trial, not a rung
    assert promotion.rungs(10, 3) == [1, 3, 9]
    assert promotion.rungs(16, 2) == [1, 2, 4, 8]
    assert promotion.rungs(2, 3) == [1]
    assert promotion.rungs(1, 3) == []  # one evaluation: nothing to judge before the end
    assert promotion.rungs(0, 3)[:4] == [1, 3, 9, 27]  # not known in advance (eval_every_steps)


def _entries(*values: float) -> list[promotion.Entry]:
    return [promotion.Entry(number, value) for number, value in enumerate(values)]


def test_a_rung_keeps_the_top_floor_n_over_eta() -> None:
    # n = 2 of eta 3: floor(2/3) = 0, nobody goes on yet; n = 3: the best one; n = 6: the best two.
    assert promotion.top(_entries(0.5, 0.9), 3, MAX) == []
    assert promotion.top(_entries(0.5, 0.9, 0.7), 3, MAX) == [1]
    assert promotion.top(_entries(0.5, 0.9, 0.7, 0.1, 0.8, 0.6), 3, MAX) == [1, 4]
    assert promotion.top(_entries(0.5, 0.9, 0.7, 0.1, 0.8, 0.6), 3, MIN) == [3, 0]  # a loss: lowest first
    assert promotion.top(_entries(0.7, 0.7, 0.7, 0.7), 2, MAX) == [0, 1]  # a tie goes to the earlier trial


def test_the_first_trial_at_a_rung_always_pauses_and_a_later_better_one_goes_on_at_once() -> None:
    assert not promotion.goes_on(_entries(0.9), 0, 2, MAX)
    assert not promotion.goes_on(_entries(0.9, 0.5), 1, 2, MAX)  # second of two: floor(2/2) = 1 slot, taken
    assert promotion.goes_on(_entries(0.5, 0.9), 1, 2, MAX)  # best of two: the one slot is its own
    # The slot of a trial that went on earlier is not taken back: rank 2 of 3 still waits.
    assert not promotion.goes_on(_entries(0.9, 0.5, 0.7), 2, 3, MAX)


def _trial(number: int, curve: dict[int, float], state: TrialState = TrialState.COMPLETE,
           paused_at: int | None = None, eta: int = 2, **system: Any) -> FrozenTrial:
    log = []
    if paused_at is not None:
        log.append({"decision": "pause", "rung": 0, "evaluation": paused_at, "value": curve[paused_at], "eta": eta})
    trial = optuna.trial.create_trial(
        state=state, value=max(curve.values()) if state == TrialState.COMPLETE else None,
        intermediate_values=curve, system_attrs={**system, **({record.PROMOTION.key: log} if log else {})})
    trial.number = number
    if state == TrialState.WAITING and paused_at is not None:
        trial.datetime_start = datetime.datetime.now()  # it ran: a paused trial, not a ticket
    return trial


def test_promotable_trials_are_taken_from_the_highest_rung_down_best_first() -> None:
    paused = TrialState.WAITING
    trials = [
        # Rung at evaluation 1, eta 2, five entries: the top two are trials 1 (paused higher up) and 2.
        _trial(0, {1: 0.6}, paused, paused_at=1),
        _trial(1, {1: 0.8, 3: 0.95}, paused, paused_at=3),
        _trial(2, {1: 0.7}, paused, paused_at=1),
        _trial(3, {1: 0.5}, paused, paused_at=1),
        # Rung at evaluation 3: trial 1 (0.95) leads trial 4 (0.9): floor(2/2) = 1 slot, trial 1's.
        _trial(4, {1: 0.55, 3: 0.9, 4: 0.91}),
        # A ticket that never ran is not paused, whatever it holds.
        _trial(5, {}, paused),
    ]
    assert [t.number for t in promotion.promotable(trials, MAX)] == [1, 2]
    # Lowest first: the top two at evaluation 1 are trials 3 (0.5) and 4 (0.55, not paused); at 3, trial 4.
    assert [t.number for t in promotion.promotable(trials, MIN)] == [3]
    assert not promotion.is_paused(trials[5]) and promotion.is_paused(trials[0])


def test_a_failed_trial_that_a_retry_replaced_is_counted_once_at_a_rung() -> None:
    trials = [_trial(0, {1: 0.9}, TrialState.FAIL), _trial(1, {1: 0.9}, TrialState.RUNNING, retry_history=[0]),
              _trial(2, {1: 0.5}, TrialState.WAITING, paused_at=1)]
    assert promotion.rung_entries(trials, 1) == [promotion.Entry(1, 0.9), promotion.Entry(2, 0.5)]
    assert promotion.promotable(trials, MAX) == []  # two entries, one slot: the retry's


# --------------------------------------------------------------------------- a paused trial in the storage


def _ticketed(url: str, n: int, heartbeat: int | None = None) -> optuna.Study:
    storage = open_storage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat if heartbeat else None)
    study = optuna.create_study(study_name="asha", storage=storage, direction="maximize")
    budget.ensure_tickets(study, n)
    return study


def _run_to_rung(study: optuna.Study, value: float) -> optuna.Trial:
    """Claim a ticket, report ``value`` at evaluation 1 and let the rung judge it (eta 2)."""
    trial = claim(study)
    assert trial is not None
    trial.suggest_float("x", 0.0, 1.0)
    storage = optuna_adapter.storage_of(study)
    if liveness.native(storage):
        storage.record_heartbeat(optuna_adapter.trial_id(trial))  # type: ignore[attr-defined]  # as its worker's beat
    trial.report(value, 1)
    try:
        promotion.judge(study, trial, 1, value, eta=2, max_evaluations=4)
    except promotion.Paused:
        promotion.park(study, trial)
    return trial


def test_a_paused_trial_waits_uncounted_by_reapers_and_is_promoted_before_new_tickets(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _ticketed(url, 4, heartbeat=1)
    first = _run_to_rung(study, 0.8)
    frozen = optuna_adapter.frozen(study, first)
    assert frozen.state == TrialState.WAITING and promotion.is_paused(frozen)
    assert [d["decision"] for d in promotion.decisions(frozen)] == ["pause"]
    assert frozen.intermediate_values == {1: 0.8}, "its curve stays"
    assert budget.tally(study.get_trials(deepcopy=False)).spent == 4, "still one trial of the budget"
    time.sleep(2.5)  # its last heartbeat is now older than the grace period
    assert liveness.reap(study, 2, RetryCallback(3), clock=lambda: time.time() + 600) == []
    assert optuna_adapter.waiting_trial_ids(study, paused=True) == [optuna_adapter.trial_id(first)]
    assert optuna_adapter.trial_id(first) not in optuna_adapter.waiting_trial_ids(study), "no ticket"
    # A worse second trial: two at the rung, one slot (floor(2/2)), the first one's. It is
    # claimed before the two tickets left, and the reaper does not take it for dead on its old beat.
    second = _run_to_rung(study, 0.3)
    assert promotion.is_paused(optuna_adapter.frozen(study, second))
    promoted = claim(study)
    assert promoted is not None and promoted.number == first.number
    assert liveness.reap(study, 2, RetryCallback(3)) == []
    assert [d["decision"] for d in promotion.decisions(promoted)] == ["pause", "promote"]
    assert promotion.was_paused(promoted)
    study.tell(promoted, 0.9)
    for _ in range(2):  # the two tickets left (told without reaching the rung)
        ticket = claim(study)
        assert ticket is not None and not promotion.was_paused(ticket)
        study.tell(ticket, 0.1)
    assert claim(study) is None, "the second trial is not promotable: the rung's one slot is the first's"
    # The end of the sweep: the paused trial is pruned at its best evaluation.
    assert promotion.close(study) == [second.number]
    pruned = optuna_adapter.frozen(study, second)
    assert (pruned.state, pruned.value, promotion.decisions(pruned)[-1]["decision"]) == (TrialState.PRUNED, 0.3, "prune")
    assert budget.tally(study.get_trials(deepcopy=False)).finished == 4


def test_a_light_reader_sees_pauses_and_promotions_as_a_plain_reader_does(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _ticketed(url, 3)
    views = []
    for light in (False, True):
        storage = open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
        if light:
            optuna_adapter.read_tickets_lightly(storage)
        views.append(optuna.load_study(study_name="asha", storage=storage))

    def same() -> None:
        plain, light = ([(t.number, t.state, t.intermediate_values, t.system_attrs, t.datetime_start)
                         for t in view.get_trials(deepcopy=False)] for view in views)
        assert light == plain

    same()
    first = _run_to_rung(study, 0.8)
    same()
    second = _run_to_rung(study, 0.9)  # goes on at once: best of two
    assert optuna_adapter.frozen(study, second).state == TrialState.RUNNING
    same()
    study.tell(second, 0.9)
    third = _run_to_rung(study, 0.85)  # three at the rung, one slot: the second's
    same()
    assert promotion.close(study) == sorted([first.number, third.number])
    same()
    for view in views:
        states = {t.number: (t.state, t.value) for t in view.get_trials(deepcopy=False)}
        assert states == {0: (TrialState.PRUNED, 0.8), 1: (TrialState.COMPLETE, 0.9), 2: (TrialState.PRUNED, 0.85)}


def test_status_and_the_report_show_a_paused_trial_as_paused(tmp_path: Path) -> None:
    from sweeper import report, status

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _ticketed(url, 3)
    first = _run_to_rung(study, 0.8)
    second = _run_to_rung(study, 0.9)  # goes on at once
    study.tell(second, 0.9)
    sweep = load_sweep(str(_study_file(tmp_path, "asha", "asha")), [])
    summary = status.summarize(study, sweep)
    assert summary["counts"]["paused"] == 1 and summary["counts"]["waiting"] == 2  # the paused trial and a ticket
    assert [(p["number"], p["rung"], p["evaluation"], p["value"]) for p in summary["paused"]] == [(first.number, 0, 1, 0.8)]
    table = status.render(summary)
    assert "0 running, 2 waiting (1 paused at a rung)" in table
    assert f"{first.number:>5}     0      1   0.8000" in table
    page, _ = report.build(study, sweep)
    assert '<tr class="paused"><td>0</td><td>paused</td>' in page
    assert "paused at rung 0 (evaluation 1, 0.8)" in page and "promote@1" in page  # the second trial's decision


# --------------------------------------------------------------------------- a real trial, paused and promoted

ASHA_STUDY = """
    from sweeper import Int, LogFloat, Sweep, SyntheticText, TinyTextClassifier

    sweep = Sweep(
        name="NAME",
        model=TinyTextClassifier(layers=2, hidden=32, heads=2),
        data=SyntheticText(n_train=400, n_test=100),
        space=SPACE,
        pretrain_loss="l2sp",
        epochs=1,
        evals_per_epoch=4,
        metric="loss",
        direction="minimize",
        n_trials=N_TRIALS,
        pruner="PRUNER",
        reduction_factor=2,
        output_dir="OUTPUT_DIR",
    )
"""


def _study_file(folder: Path, name: str, pruner: str, n_trials: int = 1) -> Path:
    space = ('{"learning_rate": 3e-3, "unfreeze_depth": 1, "pretrain_loss_weight": 0.1}' if n_trials == 1 else
             '{"learning_rate": LogFloat(1e-4, 1e-2), "unfreeze_depth": Int(0, 2), "pretrain_loss_weight": 0.1}')
    body = (ASHA_STUDY.replace("NAME", name).replace("PRUNER", pruner).replace("N_TRIALS", str(n_trials))
            .replace("SPACE", space))
    return write_study(folder, body, name=f"{name}.py")


def test_asha_is_refused_where_a_trial_cannot_pause_alone(tmp_path: Path) -> None:
    from sweeper.errors import ConfigError

    path = _study_file(tmp_path, "asha", "asha")
    for overrides, expected in ((["array_size=2"], "`pruner` is 'asha' and `array_size` is 2"),
                                (["reduction_factor=1"], "`reduction_factor` is 1")):
        with pytest.raises(ConfigError) as caught:
            load_sweep(str(path), overrides)
        assert expected in str(caught.value)


def _objective(path: Path, url: str) -> tuple[optuna.Study, Objective, Any]:
    sweep = load_sweep(str(path), [])
    storage = open_storage(url, heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(study_name=sweep.name, storage=storage, direction="minimize")
    budget.ensure_tickets(study, 1)
    store = checkpoints.open_store(None, sweep.output_path)
    return study, Objective(sweep, study, WorkerInfo(0), store), store


def _resume_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "out" / "artifacts").glob("resume-*"))


def test_a_promoted_trial_continues_bit_for_bit_where_it_paused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # The same trial (study seed 0, trial 0, fixed values) run whole, and under asha.
    whole_study, whole, _ = _objective(_study_file(tmp_path, "whole", "none"), url)
    trial = claim(whole_study)
    assert trial is not None
    _tell(whole_study, trial, whole.run(trial), RetryCallback(0))
    [reference] = whole_study.get_trials(deepcopy=False)
    assert reference.state == TrialState.COMPLETE and len(reference.intermediate_values) == 4

    study, objective, _ = _objective(_study_file(tmp_path, "asha", "asha"), url)
    trial = claim(study)
    assert trial is not None
    outcome = objective.run(trial)
    assert outcome.state == TrialState.WAITING, "alone at the rung of evaluation 1: it pauses"
    _tell(study, trial, outcome, RetryCallback(0))
    assert _resume_files(tmp_path), "it keeps its resume state"
    paused_seconds = record.GPU_SECONDS.get(optuna_adapter.frozen(study, trial))
    assert paused_seconds > 0, "the device time it spent is recorded, though it is not told"
    # A worse trial reaches the rungs at evaluations 1 and 2: floor(2/2) = 1 slot each, the paused trial's.
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, value=9.0, intermediate_values={1: 9.0, 2: 9.0},
                                              params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}))
    promoted = claim(study)
    assert promoted is not None and promoted.number == trial.number
    _tell(study, promoted, objective.run(promoted), RetryCallback(0))
    done = optuna_adapter.frozen(study, promoted)
    assert done.state == TrialState.COMPLETE
    assert done.intermediate_values == reference.intermediate_values, "the same losses at every evaluation"
    assert done.value == reference.value
    assert record.STEPS.get(done) == record.STEPS.get(reference)
    assert record.GPU_SECONDS.get(done) > paused_seconds, "both runs of it counted"
    assert 0 < record.RESUMED_FROM_STEP.get(done) < record.STEPS.get(done), "it resumed, from evaluation 1"
    assert [(d["decision"], d["evaluation"]) for d in promotion.decisions(done)] == [
        ("pause", 1), ("promote", 1), ("promote", 2)]  # resumed at 1, then best of two at 2: on at once
    assert record.RESUME.get(done) is None and _resume_files(tmp_path) == [], "no resume state left behind"


# --------------------------------------------------------------------------- the whole sweep, real workers


def _sweep(folder: Path, url: str | None, workers: int) -> optuna.Study:
    path = _study_file(folder, "asha", "asha", n_trials=8)
    env = {"SWEEPER_STORAGE": url} if url else {}
    result = run_cli("launch", str(path), "--workers", str(workers), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return optuna.load_study(study_name="asha", storage=url or f"sqlite:///{folder / 'out' / 'study.db'}")


def _assert_exact(study: optuna.Study, folder: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert len(trials) == 8 and sorted(t.number for t in trials) == list(range(8))
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) + states.count(TrialState.FAIL) == 8
    assert TrialState.COMPLETE in states and not any(promotion.is_paused(t) for t in trials)
    # Which trials pause depends on the order the workers reach the rungs in; that the first
    # one there pauses does not, and every trial's record ends as its state says.
    assert any(d["decision"] == "pause" for t in trials for d in promotion.decisions(t))
    for t in trials:
        last = promotion.decisions(t)[-1]
        if t.state == TrialState.PRUNED:
            assert last["decision"] == "prune" and t.value == min(t.intermediate_values.values()), \
                "pruned at the end at its best evaluation (a loss)"
        elif t.state == TrialState.COMPLETE:
            assert (last["decision"], last["evaluation"]) == ("promote", 2), "it went on from the last rung"
    assert all(record.RESUME.get(t) is None for t in trials)
    assert _resume_files(folder) == [], "no orphan resume file"


# About 35 s each (three workers load PyTorch): PostgreSQL's runs in the long set.
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.long])])
def test_budget_is_exact_with_real_workers_and_nothing_is_left_paused(backend: str, request, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    study = _sweep(tmp_path, url, workers=3)
    _assert_exact(study, tmp_path)
