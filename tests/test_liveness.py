"""Liveness: which running trials are dead, failing them, and queueing their retries.

The reaper is handed a clock that runs ahead instead of the tests sleeping past a grace period;
tests/test_workers.py kills real worker processes.
"""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from sweeper import budget, liveness, optuna_adapter, record, storage
from sweeper.worker import RetryCallback


def _study(url: str, n_trials: int, heartbeat: int | None = 1) -> optuna.Study:
    opened = storage.open_storage(url, heartbeat_interval=heartbeat, grace_period=4 if heartbeat else None,
                                  stale_trial_callback=RetryCallback(3) if heartbeat else None)
    study = optuna.create_study(study_name="liveness", storage=opened, direction="maximize")
    budget.ensure_tickets(study, n_trials)
    return study


def _start(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """Claim the oldest ticket as a worker would, without running it."""
    [ticket, *_] = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert optuna_adapter.storage_of(study).set_trial_state_values(optuna_adapter.trial_id(ticket), TrialState.RUNNING)
    return optuna_adapter.frozen(study, ticket)


def _later(seconds: float):  # type: ignore[no-untyped-def]
    return lambda: time.time() + seconds


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_reaped_too(storage_url: str) -> None:
    # Optuna's own stale query skips a running trial with no heartbeat row at all.
    study = _study(storage_url, 2)
    ticket = _start(study)
    assert liveness.reap(study, 4, RetryCallback(3)) == [], "not before the grace period"
    assert liveness.reap(study, 4, RetryCallback(3), clock=_later(4.5)) == [ticket.number]
    failed = optuna_adapter.frozen(study, ticket)
    assert failed.state == TrialState.FAIL and "no heartbeat" in record.FAIL_REASON.get(failed)


def test_a_beating_trial_lives_and_a_silent_one_is_reaped_once(storage_url: str) -> None:
    study = _study(storage_url, 2)
    alive, silent = _start(study), _start(study)
    heartbeat = optuna_adapter.storage_of(study)
    with liveness.Heartbeat(heartbeat, optuna_adapter.trial_id(alive), 1):
        time.sleep(0.2)  # its first beat
    assert liveness.reap(study, 4, RetryCallback(3), clock=_later(2)) == []
    reaped = liveness.reap(study, 4, RetryCallback(3), clock=_later(30))
    assert sorted(reaped) == [alive.number, silent.number], "30 s of silence is past any grace of 4 s"
    assert liveness.reap(study, 4, RetryCallback(3), clock=_later(30)) == [], "once only"
    tally = budget.tally(study.get_trials(deepcopy=False))
    assert (tally.retried, tally.waiting) == (2, 2), "each is queued again, keeping its place in the budget"


def test_behind_a_storage_without_heartbeats_the_attribute_heartbeat_decides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # As behind `sweeper proxy`: no heartbeat of Optuna's, so the worker writes heartbeat_at.
    study = _study(f"sqlite:///{tmp_path / 'study.db'}", 2, heartbeat=None)
    beating, silent = _start(study), _start(study)
    storage_ = optuna_adapter.storage_of(study)
    assert not liveness.native(storage_)
    with liveness.Heartbeat(storage_, optuna_adapter.trial_id(beating), 60):
        time.sleep(0.2)
    assert record.HEARTBEAT_AT.get(optuna_adapter.frozen(study, beating)) is not None
    # 10 s later: the silent one is judged by its start, the beating one by its beat, both stale.
    assert sorted(liveness.reap(study, 4, RetryCallback(3), clock=_later(10))) == [beating.number, silent.number]


def test_failing_a_trial_someone_else_finished_does_nothing(storage_url: str) -> None:
    study = _study(storage_url, 1)
    trial = _start(study)
    optuna_adapter.storage_of(study).set_trial_state_values(optuna_adapter.trial_id(trial), TrialState.COMPLETE, [1.0])
    assert liveness.fail_trial(study, trial, RetryCallback(3), "test") is False
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE]


def test_retries_stop_after_max_retries(storage_url: str) -> None:
    study = _study(storage_url, 1)
    retry = RetryCallback(max_retries=1)
    assert liveness.fail_trial(study, _start(study), retry, "test")
    assert liveness.fail_trial(study, _start(study), retry, "test")
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), "no third attempt"
    tally = budget.tally(study.get_trials(deepcopy=False))
    assert (tally.failed, tally.retried) == (1, 1)
