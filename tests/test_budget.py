"""The trial budget: what counts as spent, the tickets that make it exact, and the time limits.

Every test runs against SQLite and PostgreSQL (``storage_url``): the budget is read from what
the storage gives back (states, retry histories, start times), not from what was written.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, record
from sweeper.storage import open_storage
from sweeper.worker import RetryCallback, claim

X = FloatDistribution(0.0, 1.0)


def _study(url: str) -> optuna.Study:
    storage = open_storage(url, heartbeat_interval=None, grace_period=None)
    return optuna.create_study(study_name="budget", storage=storage, direction="maximize")


def _trial(state: TrialState, *, retry_of: list[int] | None = None, started_ago_s: float | None = None,
           attrs: dict[str, Any] | None = None) -> FrozenTrial:
    """A trial in ``state`` with the user attributes ``attrs``; ``retry_of`` is the retry
    history of a retry, ``started_ago_s`` how long ago it started."""
    system_attrs = {record.RETRY_HISTORY.key: retry_of} if retry_of is not None else {}
    trial = optuna.create_trial(
        state=state, value=0.5 if state == TrialState.COMPLETE else None,
        params={"x": 0.5} if state != TrialState.WAITING else {},
        distributions={"x": X} if state != TrialState.WAITING else {},
        user_attrs=attrs or {}, system_attrs=system_attrs)
    if started_ago_s is not None:
        trial.datetime_start = datetime.now() - timedelta(seconds=started_ago_s)
    return trial


def _add(study: optuna.Study, *trials: FrozenTrial) -> list[FrozenTrial]:
    for trial in trials:
        study.add_trial(trial)
    return study.get_trials(deepcopy=False)


# --------------------------------------------------------------------------- superseded and tally


def test_superseded_names_every_trial_in_a_retry_history(storage_url: str) -> None:
    study = _study(storage_url)
    trials = _add(study,
                  _trial(TrialState.FAIL),  # 0: cut off, retried by 2
                  _trial(TrialState.FAIL),  # 1: failed for good
                  _trial(TrialState.FAIL, retry_of=[0]),  # 2: the retry, cut off again, retried by 3
                  _trial(TrialState.WAITING, retry_of=[0, 2]))  # 3: the retry of the retry
    assert budget.superseded(trials) == {0, 2}


def test_superseded_is_empty_without_retries(storage_url: str) -> None:
    study = _study(storage_url)
    trials = _add(study, _trial(TrialState.FAIL), _trial(TrialState.COMPLETE))
    assert budget.superseded(trials) == set()


def test_tally_counts_every_state_and_tells_retried_from_failed_for_good(storage_url: str) -> None:
    study = _study(storage_url)
    trials = _add(study,
                  _trial(TrialState.COMPLETE),  # 0
                  _trial(TrialState.COMPLETE),  # 1
                  _trial(TrialState.PRUNED),  # 2
                  _trial(TrialState.FAIL),  # 3: retried by 6
                  _trial(TrialState.FAIL),  # 4: failed for good
                  _trial(TrialState.RUNNING),  # 5
                  _trial(TrialState.WAITING, retry_of=[3]),  # 6
                  _trial(TrialState.WAITING))  # 7: a ticket
    assert budget.tally(trials) == budget.Tally(waiting=2, running=1, complete=2, pruned=1, failed=1, retried=1)


def test_finished_counts_failed_for_good_and_spent_leaves_out_the_retried(storage_url: str) -> None:
    study = _study(storage_url)
    trials = _add(study,
                  _trial(TrialState.COMPLETE),  # 0
                  _trial(TrialState.PRUNED),  # 1
                  _trial(TrialState.FAIL),  # 2: failed for good
                  _trial(TrialState.FAIL),  # 3: retried by 5
                  _trial(TrialState.RUNNING),  # 4
                  _trial(TrialState.WAITING, retry_of=[3]))  # 5
    tally = budget.tally(trials)
    assert tally.finished == 3, "complete + pruned + failed for good"
    assert tally.spent == 5, "the retried trial 3 keeps its place through its retry, not twice"


def test_an_empty_study_has_spent_nothing(storage_url: str) -> None:
    tally = budget.tally(_study(storage_url).get_trials())
    assert (tally.finished, tally.spent) == (0, 0)


# --------------------------------------------------------------------------- tickets


def test_tickets_fill_an_empty_study_to_the_budget_and_record_it(storage_url: str) -> None:
    study = _study(storage_url)
    assert budget.ensure_tickets(study, 5) == 5
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.WAITING] * 5
    assert all(t.params == {} for t in trials), "a ticket has no parameters: the sampler proposes them"
    assert record.N_TRIALS.get(study) == 5


def test_tickets_are_added_only_where_the_budget_is_not_yet_spent(storage_url: str) -> None:
    study = _study(storage_url)
    budget.ensure_tickets(study, 4)
    done = claim(study)
    assert done is not None
    study.tell(done, done.suggest_float("x", 0.0, 1.0))
    cut_off = claim(study)
    assert cut_off is not None
    cut_off.suggest_float("x", 0.0, 1.0)
    RetryCallback(3)(study, study.tell(cut_off, state=TrialState.FAIL))  # its retry takes its place
    given_up = claim(study)
    assert given_up is not None
    study.tell(given_up, state=TrialState.FAIL)  # failed for good: counts as spent
    assert budget.ensure_tickets(study, 4) == 0
    assert len(study.get_trials(deepcopy=False)) == 5, "four in the budget, plus the retried trial"


def test_tickets_replace_only_the_missing_part_of_the_budget(storage_url: str) -> None:
    study = _study(storage_url)
    _add(study, _trial(TrialState.COMPLETE), _trial(TrialState.RUNNING), _trial(TrialState.FAIL),
         _trial(TrialState.WAITING, retry_of=[2]))
    assert budget.ensure_tickets(study, 6) == 3, "six, less one complete, one running, one retry waiting"
    assert budget.tally(study.get_trials(deepcopy=False)).spent == 6


def test_a_second_call_with_the_same_budget_adds_nothing(storage_url: str) -> None:
    study = _study(storage_url)
    budget.ensure_tickets(study, 3)
    assert budget.ensure_tickets(study, 3) == 0
    assert len(study.get_trials(deepcopy=False)) == 3


def test_raising_the_budget_adds_only_the_difference(storage_url: str) -> None:
    study = _study(storage_url)
    budget.ensure_tickets(study, 5)
    assert budget.ensure_tickets(study, 8) == 3
    assert len(study.get_trials(deepcopy=False)) == 8
    assert record.N_TRIALS.get(study) == 8


def test_a_budget_below_what_is_spent_adds_nothing_and_records_the_budget_in_effect(storage_url: str) -> None:
    study = _study(storage_url)
    budget.ensure_tickets(study, 5)
    assert budget.ensure_tickets(study, 2) == 0
    assert len(study.get_trials(deepcopy=False)) == 5, "tickets already queued are not taken back"
    assert record.N_TRIALS.get(study) == 5, "the budget recorded is the one in effect (issue 17.7)"


def test_first_trials_go_on_the_first_tickets_in_order(storage_url: str) -> None:
    study = _study(storage_url)
    assert budget.ensure_tickets(study, 4, first=[{"x": 0.25}, {"x": 1e-4}]) == 4
    queued = [record.FIXED_PARAMS.get(t) for t in study.get_trials(deepcopy=False)]
    assert queued == [{"x": 0.25}, {"x": 1e-4}, {}, {}]


def test_first_trials_are_queued_once_per_study_not_again_on_a_second_call(storage_url: str) -> None:
    study = _study(storage_url)
    first = [{"x": 0.25}, {"x": 1e-4}]
    budget.ensure_tickets(study, 3, first=first)
    ran = claim(study)  # the first of them runs and finishes before the relaunch
    assert ran is not None
    study.tell(ran, ran.suggest_float("x", 0.0, 1.0))
    assert budget.ensure_tickets(study, 5, first=first) == 2
    queued = [record.FIXED_PARAMS.get(t) for t in study.get_trials(deepcopy=False)]
    assert queued == [{"x": 0.25}, {"x": 1e-4}, {}, {}, {}]


def test_first_trials_that_a_retry_carries_are_not_queued_again(storage_url: str) -> None:
    study = _study(storage_url)
    first = [{"x": 0.25}]
    budget.ensure_tickets(study, 1, first=first)
    cut_off = claim(study)
    assert cut_off is not None
    cut_off.suggest_float("x", 0.0, 1.0)
    RetryCallback(3)(study, study.tell(cut_off, state=TrialState.FAIL))
    assert budget.ensure_tickets(study, 2, first=first) == 1
    fresh = study.get_trials(deepcopy=False)[-1]
    assert record.FIXED_PARAMS.get(fresh) == {}, "the retry already holds the first trial's values"


def test_first_trials_beyond_the_budget_are_left_out(storage_url: str) -> None:
    study = _study(storage_url)
    assert budget.ensure_tickets(study, 1, first=[{"x": 0.25}, {"x": 0.75}]) == 1
    assert [record.FIXED_PARAMS.get(t) for t in study.get_trials(deepcopy=False)] == [{"x": 0.25}]


# --------------------------------------------------------------------------- time and GPU-hours


def test_a_passed_deadline_stops_new_trials(storage_url: str) -> None:
    study = _study(storage_url)
    record.DEADLINE.set(study, time.time() - 1)
    assert budget.out_of_time(study) == "the sweep's time limit (--timeout) is reached"


def test_a_deadline_still_ahead_lets_trials_start(storage_url: str) -> None:
    study = _study(storage_url)
    record.DEADLINE.set(study, time.time() + 3600)
    assert budget.out_of_time(study) is None


def test_no_limits_set_as_the_launcher_writes_them_lets_trials_start(storage_url: str) -> None:
    study = _study(storage_url)
    assert budget.out_of_time(study) is None, "a study without any limit"
    record.DEADLINE.set(study, None)
    record.GPU_SECONDS_BUDGET.set(study, None)
    _add(study, _trial(TrialState.COMPLETE, attrs={record.GPU_SECONDS.key: 1e9}))
    assert budget.out_of_time(study) is None


def test_the_gpu_budget_is_spent_by_finished_trials(storage_url: str) -> None:
    study = _study(storage_url)
    record.GPU_SECONDS_BUDGET.set(study, 3600.0)
    _add(study, _trial(TrialState.COMPLETE, attrs={record.GPU_SECONDS.key: 3000.0}),
         _trial(TrialState.FAIL, attrs={record.GPU_SECONDS.key: 599.0}))
    assert budget.out_of_time(study) is None, "3599 of 3600 device-seconds"
    _add(study, _trial(TrialState.PRUNED, attrs={record.GPU_SECONDS.key: 1.0}))
    assert budget.out_of_time(study) == "the sweep's GPU-hours budget (1 h) is spent"


def test_the_gpu_budget_is_spent_by_running_trials_on_every_device_they_hold(storage_url: str) -> None:
    study = _study(storage_url)
    record.GPU_SECONDS_BUDGET.set(study, 360.0)
    _add(study, _trial(TrialState.RUNNING, started_ago_s=300))  # one device by default: 300 s
    assert budget.out_of_time(study) is None
    _add(study, _trial(TrialState.RUNNING, started_ago_s=40, attrs={record.DEVICES.key: 2}))  # 80 s more
    assert budget.out_of_time(study) == "the sweep's GPU-hours budget (0.1 h) is spent"


def test_the_deadline_is_reported_before_the_gpu_budget(storage_url: str) -> None:
    study = _study(storage_url)
    record.DEADLINE.set(study, time.time() - 1)
    record.GPU_SECONDS_BUDGET.set(study, 1.0)
    _add(study, _trial(TrialState.COMPLETE, attrs={record.GPU_SECONDS.key: 10.0}))
    assert budget.out_of_time(study) == "the sweep's time limit (--timeout) is reached"


def test_gpu_seconds_spent_adds_finished_records_and_running_elapsed_times_devices(storage_url: str) -> None:
    study = _study(storage_url)
    trials = _add(study,
                  _trial(TrialState.COMPLETE, attrs={record.GPU_SECONDS.key: 100.0}),
                  _trial(TrialState.PRUNED, attrs={record.GPU_SECONDS.key: 50.0}),
                  _trial(TrialState.FAIL, attrs={record.GPU_SECONDS.key: 25.0}),
                  _trial(TrialState.FAIL),  # died before recording: counts nothing
                  _trial(TrialState.WAITING, attrs={record.GPU_SECONDS.key: 1000.0}),  # not started: nothing
                  _trial(TrialState.RUNNING, started_ago_s=10, attrs={record.DEVICES.key: 2}),  # about 20
                  _trial(TrialState.RUNNING, started_ago_s=5))  # about 5
    spent = budget.gpu_seconds_spent(trials)
    assert 200.0 <= spent < 205.0, spent


def test_gpu_seconds_spent_is_zero_for_an_empty_study(storage_url: str) -> None:
    assert budget.gpu_seconds_spent(_study(storage_url).get_trials()) == 0.0


def test_a_paused_trial_counts_its_recorded_runs_and_a_resumed_one_its_current_run_after_them() -> None:
    # pruner="asha": a paused trial is WAITING with a start time and the device-seconds of its
    # runs so far; once resumed, its current run is timed from the resumption, not from its start.
    paused = _trial(TrialState.WAITING, started_ago_s=3600, attrs={record.GPU_SECONDS.key: 40.0})
    resumed = _trial(TrialState.RUNNING, started_ago_s=3600, attrs={record.GPU_SECONDS.key: 30.0})
    resumed.system_attrs[record.PROMOTION.key] = [
        {"decision": "pause", "at": time.time() - 3000},
        {"decision": "promote", "resumed": True, "at": time.time() - 10}]
    ticket = _trial(TrialState.WAITING, attrs={record.GPU_SECONDS.key: 1000.0})  # never started: nothing
    assert budget.run_started(resumed) == pytest.approx(time.time() - 10, abs=1)
    spent = budget.gpu_seconds_spent([paused, resumed, ticket])
    assert 80.0 <= spent < 82.0, spent
