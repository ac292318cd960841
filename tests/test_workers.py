"""The worker machinery (tickets, claiming, heartbeats, retries) with many real processes.

The objective here is trivial (tests/trivial_worker.py) so that eight processes cost little;
the fine-tuning workers go through the same `worker.serve` loop (tests/test_launcher.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from sweeper import budget, liveness, record, storage
from sweeper.worker import RetryCallback
from tests.helpers import ROOT


def _create(url: str, n_trials: int) -> optuna.Study:
    opened = storage.open_storage(url, heartbeat_interval=1, grace_period=4,
                                  stale_trial_callback=RetryCallback(3))
    study = optuna.create_study(study_name="budget", storage=opened, direction="maximize")
    budget.ensure_tickets(study, n_trials)
    return study


def _workers(url: str, count: int, seconds: float = 0.0) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-m", "tests.trivial_worker", url, "budget", str(i), str(seconds)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(count)]


def _wait(processes: list[subprocess.Popen[bytes]], timeout: float = 120) -> str:
    """Wait for every worker to exit cleanly; returns what they wrote to stderr."""
    deadline = time.time() + timeout
    errors = []
    for p in processes:
        _, err = p.communicate(timeout=max(1, deadline - time.time()))
        errors.append(err.decode())
        assert p.returncode == 0, errors[-1][-2000:]
    return "".join(errors)


@pytest.mark.parametrize("backend, workers", [("sqlite", 8), ("postgresql", 4)])
def test_many_workers_finish_exactly_the_budget(backend: str, workers: int, request, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    study = _create(url, 40)
    stderr = _wait(_workers(url, workers))
    assert "database is locked" not in stderr and "retrying" not in stderr
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(40)), "no duplicate trial numbers, none lost, none beyond"
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({record.PID.get(t) for t in trials}) > 1, "the work was shared"
    tally = budget.tally(trials)
    assert (tally.finished, tally.waiting, tally.running) == (40, 0, 0)


def test_launching_again_tops_up_the_budget_without_duplicating_it(storage_url: str) -> None:
    study = _create(storage_url, 5)
    assert budget.ensure_tickets(study, 5) == 0
    assert budget.ensure_tickets(study, 8) == 3
    assert len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) == 8


def test_first_trials_run_first_with_their_values_and_are_queued_once(storage_url: str) -> None:
    study = _create(storage_url, 0)
    assert budget.ensure_tickets(study, 4, [{"x": 0.25}, {"x": 0.75}]) == 4
    _wait(_workers(storage_url, 1))
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.datetime_start)
    assert [t.params["x"] for t in trials[:2]] == [0.25, 0.75], "claimed first, with their values"
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # A launch again (a resume, a raised budget) does not queue them a second time.
    assert budget.ensure_tickets(study, 6, [{"x": 0.25}, {"x": 0.75}]) == 2
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 2 and not any(t.system_attrs.get("fixed_params") for t in waiting)


def test_a_killed_workers_trial_is_failed_after_its_grace_period_and_retried(storage_url: str) -> None:
    study = _create(storage_url, 3)
    [victim] = _workers(storage_url, 1, seconds=60.0)
    deadline = time.time() + 60
    while not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        assert time.time() < deadline, "the worker never started a trial"
        time.sleep(0.2)
    [running] = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    # Five seconds later by the reaper's clock: past the 4 s grace period, without the wait.
    assert liveness.reap(study, 4, RetryCallback(3), clock=lambda: time.time() + 5) == [running.number]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[running.number].state == TrialState.FAIL
    [retry] = [t for t in trials.values() if t.system_attrs.get("failed_trial") == running.number]
    assert retry.state == TrialState.WAITING and retry.params == trials[running.number].params
    _wait(_workers(storage_url, 2))
    tally = budget.tally(study.get_trials(deepcopy=False))
    assert (tally.complete, tally.retried, tally.failed, tally.waiting) == (3, 1, 0, 0)


def test_the_owner_check_fails_a_dead_workers_trial_at_once(storage_url: str) -> None:
    study = _create(storage_url, 2)
    [victim] = _workers(storage_url, 1, seconds=60.0)
    deadline = time.time() + 60
    while not [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if record.PID.get(t) is not None]:
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    reaped = liveness.reap_dead(study, [victim.pid], RetryCallback(3))
    assert len(reaped) == 1
    assert study.get_trials(deepcopy=False)[reaped[0]].user_attrs["fail_reason"].startswith("its worker (pid")
    assert liveness.reap_dead(study, [victim.pid], RetryCallback(3)) == []  # once only
