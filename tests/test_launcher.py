"""The launcher and its fine-tuning workers through the real CLI: dead workers, preemption,
Ctrl-C and resume, trials that fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, record, storage
from sweeper.errors import SweepError
from sweeper.launcher import LaunchOptions, plan_slots
from tests.helpers import ROOT, TINY_STUDY, run_cli, write_study

# Trials long enough to be caught in the middle: 2,400 sentences in batches of 16, 4 evaluations
# per epoch (1.5 to 2 s a trial on a quiet 2-core machine, in a worker that starts with
# everything imported).
SLOW_TRIALS = ["n_trials=3", "epochs=2", "evals_per_epoch=4", "data.n_train=2400", "space.batch_size=16",
               "pruner=none", "space.learning_rate=1e-3"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _launch(study: Path, url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SWEEPER_STORAGE": url}
    return subprocess.Popen([sys.executable, "-m", "sweeper", "launch", str(study), "--heartbeat", "1",
                             "--grace", "6", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group, as at a terminal


class _Watcher:
    """Reads a sweep's trials every few tenths of a second with one storage, opened once the
    launcher has made the study: reopening at every look is slow enough, on a busy machine,
    to miss the moment a test waits for."""

    def __init__(self, url: str) -> None:
        self.url, self.storage = url, None

    def trials(self) -> list[FrozenTrial]:
        try:
            self.storage = self.storage or storage.open_storage(
                self.url, heartbeat_interval=None, grace_period=None, create_tables=False)
            return optuna.load_study(study_name="tiny", storage=self.storage).get_trials(deepcopy=False)
        except (SweepError, KeyError):  # not created yet
            return []

    def close(self) -> None:
        if self.storage is not None:
            self.storage.engine.dispose()


def _trials(url: str) -> list[FrozenTrial]:
    """One look at the sweep's trials ([] before the launcher made the study)."""
    watcher = _Watcher(url)
    try:
        return watcher.trials()
    finally:
        watcher.close()


def _wait_for(url: str, found: Callable[[FrozenTrial], bool], launcher: subprocess.Popen[str],
              timeout: float = 120) -> FrozenTrial:
    deadline = time.time() + timeout
    watcher = _Watcher(url)
    while time.time() < deadline:
        trials = watcher.trials()
        for trial in trials:
            if found(trial):
                watcher.close()
                return trial
        if launcher.poll() is not None:
            raise AssertionError(f"the launcher exited with {launcher.returncode} before any trial was "
                                 f"caught: {launcher.communicate()[1][-3000:]}")
        time.sleep(0.2)
    launcher.kill()
    raise AssertionError(f"timed out waiting for a trial; trials: {[(t.number, t.state.name, t.user_attrs.get('progress')) for t in trials]}; "
                         f"launcher: {launcher.communicate()[1][-3000:]}")


def _mid_training(trial: FrozenTrial) -> bool:
    """Running, with a resume point saved (at least one evaluation done), in its first half:
    on a loaded machine the signal may land a few evaluations after the trial was seen."""
    progress = trial.user_attrs.get("progress", {})
    return (trial.state == TrialState.RUNNING and record.RESUME.get(trial) is not None
            and progress.get("evaluation", 99) <= 4)


def _caught_mid_trial(tmp_path: Path) -> tuple[str, subprocess.Popen[str], FrozenTrial]:
    """A one-worker sweep of SLOW_TRIALS on SQLite, and the first trial caught mid-training."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = write_study(tmp_path, TINY_STUDY)
    launcher = _launch(study, url, "--workers", "1", *_sets(SLOW_TRIALS))
    return url, launcher, _wait_for(url, _mid_training, launcher)


def _retry_of(trials: list[FrozenTrial], number: int) -> FrozenTrial:
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    return retry


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.long
def test_kill_9_of_a_worker_mid_trial_resumes_the_trial_from_its_checkpoint(tmp_path: Path) -> None:
    # On SQLite only, to keep the suite short: the same reaping and resume on PostgreSQL are
    # shown by tests/test_workers.py and tests/test_storage.py (a server restart mid-sweep).
    storage_url, launcher, victim = _caught_mid_trial(tmp_path)
    saved_step = record.RESUME.get(victim)["step"]
    os.kill(record.PID.get(victim), signal.SIGKILL)
    out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    assert "restarting it" in err
    trials = _trials(storage_url)
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and "died" in killed.user_attrs["fail_reason"]
    retry = _retry_of(trials, victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["resumed_from_step"] == saved_step > 0, "continued, not restarted"
    assert retry.user_attrs["lineage"] == [victim.number]
    tally = budget.tally(trials)
    assert (tally.finished, tally.complete, tally.retried, tally.waiting, tally.running) == (3, 3, 1, 0, 0)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.long
def test_sigterm_checkpoints_hands_back_and_the_retry_resumes_at_that_step(tmp_path: Path) -> None:
    url, launcher, victim = _caught_mid_trial(tmp_path)
    os.kill(record.PID.get(victim), signal.SIGTERM)
    out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    trials = _trials(url)
    handed_back = next(t for t in trials if t.number == victim.number)
    assert handed_back.state == TrialState.FAIL
    assert handed_back.user_attrs["fail_reason"].startswith("preempted: stopped at step")
    stopped_at = int(handed_back.user_attrs["fail_reason"].split("stopped at step ")[1].split()[0])
    retry = _retry_of(trials, victim.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_step"] == stopped_at, "resumed at the step it stopped, not an evaluation"
    assert budget.tally(trials).finished == 3


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.long
def test_ctrl_c_stops_every_worker_cleanly_and_launching_again_resumes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = write_study(tmp_path, TINY_STUDY)
    sets = _sets([*SLOW_TRIALS, "n_trials=2"])  # one trial for each worker, both caught mid-training
    launcher = _launch(study, url, "--workers", "2", *sets)
    caught = _wait_for(url, _mid_training, launcher)
    # A terminal's Ctrl-C goes to the whole foreground process group; the workers are in
    # sessions of their own, so only the launcher gets it and stops them in order.
    assert os.getsid(record.PID.get(caught)) == record.PID.get(caught) != os.getsid(launcher.pid)
    os.killpg(launcher.pid, signal.SIGINT)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err[-3000:]
    trials = _trials(url)
    assert not [t for t in trials if t.state == TrialState.RUNNING], "nothing left running"
    finished_before = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    handed_back = [t for t in trials if t.state == TrialState.FAIL]
    assert handed_back and all(t.user_attrs["fail_reason"].startswith("preempted") for t in handed_back)
    again = _launch(study, url, "--workers", "2", *sets)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-3000:]
    trials = _trials(url)
    assert {t.number: t.value for t in trials if t.number in finished_before} == finished_before
    tally = budget.tally(trials)
    assert (tally.finished, tally.complete, tally.waiting) == (2, 2, 0)
    for trial in handed_back:
        assert _retry_of(trials, trial.number).user_attrs["resumed_from_step"] > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_failing_trials_are_recorded_with_their_reason_and_the_sweep_goes_on(tmp_path: Path) -> None:
    study = write_study(tmp_path, TINY_STUDY)
    sets = ["n_trials=8", "sampler=random", "pruner=none", "space.max_grad_norm=0.0",
            "space.learning_rate=[1e12, 1e-3]", "space.batch_size=[0, 16]"]
    result = run_cli("launch", str(study), "--workers", "2", *_sets(sets))
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL]
    assert any("batch_size" in r for r in reasons), reasons
    assert any("diverged" in r for r in reasons), reasons
    assert any(t.state == TrialState.COMPLETE for t in trials)
    assert budget.tally(trials).finished == 8
    status = run_cli("status", str(study))
    assert "failed" in status.stdout and "batch_size" in status.stdout


def _options(**kw: object) -> LaunchOptions:
    return LaunchOptions(study_path="s.py", overrides=[], url="sqlite://", **kw)


def test_gpus_are_shared_round_robin_with_k_workers_per_gpu() -> None:
    assert [s.gpu for s in plan_slots(_options(workers_per_gpu=2), available=["0", "1"])] == ["0", "1", "0", "1"]
    assert [s.gpu for s in plan_slots(_options(workers=3, gpus=["2"], workers_per_gpu=3), available=["0", "2"])] == ["2"] * 3
    assert [s.gpu for s in plan_slots(_options(workers=2), available=[])] == [None, None]
    assert len(plan_slots(_options(), available=[])) == 1


@pytest.mark.parametrize("kw, message", [
    (dict(workers=5), "raise --workers-per-gpu to 3"),
    (dict(gpus=["7"]), "names GPU 7, which this machine does not have"),
    (dict(workers_per_gpu=0), "use 1 or more"),
])
def test_impossible_gpu_plans_are_refused(kw: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SweepError, match=message):
        plan_slots(_options(**kw), available=["0", "1"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_gpu_hours_budget_stops_new_trials_across_the_sweep(tmp_path: Path) -> None:
    """0.00002 GPU-hours (0.072 device-seconds) is spent by the first trial (1,600 sentences, a few
    tenths of a second even in a worker that starts with everything imported): none starts after it."""
    study = write_study(tmp_path, TINY_STUDY)
    result = run_cli("launch", str(study), "--workers", "1", "--n-trials", "5", "--gpu-hours", "0.00002",
                     "--set", "data.n_train=1600")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    tally = budget.tally(trials)
    assert (tally.finished, tally.waiting) == (1, 4)
    assert budget.gpu_seconds_spent(trials) >= 0.072
    log = (tmp_path / "out" / "logs" / "worker-0.log").read_text()
    assert "GPU-hours budget (2e-05 h) is spent" in log


def test_no_trial_starts_after_the_deadline(tmp_path: Path) -> None:
    from sweeper.worker import RetryCallback

    url = f"sqlite:///{tmp_path / 'study.db'}"
    opened = storage.open_storage(url, heartbeat_interval=1, grace_period=4, stale_trial_callback=RetryCallback(1))
    study = optuna.create_study(study_name="budget", storage=opened)
    budget.ensure_tickets(study, 3)
    record.DEADLINE.set(study, time.time() - 1)
    assert budget.out_of_time(study) == "the sweep's time limit (--timeout) is reached"
    worker = subprocess.run([sys.executable, "-m", "tests.trivial_worker", url, "budget", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr
    assert budget.tally(study.get_trials(deepcopy=False)).waiting == 3
