"""Trial arrays in the worker (issue 21): real sweeps through the real CLI with --array-size.

Each member is an ordinary trial (its own ticket, value, checkpoint and device-seconds), the
budget stays exact, members share the structure the first drew, a member retried alone sees
the same batches and ends with the same curve, and a worker killed mid-array has every member
retried from its own resume state.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, record, worker
from sweeper.outcome import WorkerInfo
from sweeper.study import load as load_sweep
from tests.helpers import TINY_STUDY, run_cli, write_study
from tests.test_launcher import _launch, _trials, _Watcher

pytestmark = pytest.mark.xdist_group("worker_arrays")

ARRAY_STUDY = TINY_STUDY.replace('"unfreeze_depth": Int(0, 2),', '"unfreeze_depth": Int(1, 2),')


def _load(url: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name="tiny", storage=url).get_trials(deepcopy=False)


def _arrays(trials: list[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """The members of each array, by its first trial's number."""
    groups: dict[int, list[FrozenTrial]] = {}
    for trial in trials:
        place = record.ARRAY.get(trial)
        if place:
            groups.setdefault(place["first"], []).append(trial)
    return groups


@pytest.mark.slow
def test_an_array_sweep_counts_every_member_once_on_both_storages(tmp_path: Path, storage_url_postgres_long: str) -> None:
    storage_url = storage_url_postgres_long
    study = write_study(tmp_path, ARRAY_STUDY)
    started = time.time()
    result = run_cli("launch", str(study), "--storage", storage_url, "--workers", "2", "--array-size", "3",
                     "--set", "n_trials=8", "--set", "pruner=none")
    wall = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _load(storage_url)
    tally = budget.tally(trials)
    assert (tally.finished, tally.complete, tally.waiting, tally.running) == (8, 8, 0, 0)
    groups = _arrays(trials)
    assert sum(len(members) for members in groups.values()) == 8, "every trial trained in an array"
    assert max(len(members) for members in groups.values()) >= 2, "some array held several members"
    # Both depths were tried (array_structure.py): a new array starts at an untried structure.
    assert {t.params["unfreeze_depth"] for t in trials} == {1, 2}
    for first, members in groups.items():
        # The structure the first member drew is every member's; the rest is each one's own.
        assert {m.params["unfreeze_depth"] for m in members} == {members[0].params["unfreeze_depth"]}
        assert len({m.params["learning_rate"] for m in members}) == len(members)
        assert {record.ARRAY.get(m)["batch_seed"] for m in members} == {record.ARRAY.get(members[0])["batch_seed"]}
        assert any(m.number == first for m in members)
    for trial in trials:  # its own checkpoint, value and share of the device
        assert record.CHECKPOINT.get(trial)["files"] and record.CHECKPOINT.get(trial)["value"] == trial.value
        assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
        assert 0 < record.DEVICES.get(trial) <= 1 / 3 + 1e-9
    # Device-seconds are shares: two workers' arrays spend no more than two workers' wall time.
    assert budget.gpu_seconds_spent(trials) < 2 * wall
    # `sweeper best` cannot tell a member from a trial alone.
    best = run_cli("best", str(study), "--storage", storage_url, "--out", str(tmp_path / "best"))
    assert best.returncode == 0, best.stderr[-2000:]
    from sweeper.finetune.models import from_checkpoint

    assert from_checkpoint(tmp_path / "best") is not None


@pytest.mark.slow
def test_a_member_retried_alone_sees_its_batches_and_ends_with_its_curve(tmp_path: Path) -> None:
    # One structure: nothing to explore, so the array refills for as long as there are tickets.
    study = write_study(tmp_path, ARRAY_STUDY.replace('"unfreeze_depth": Int(1, 2),', '"unfreeze_depth": 2,'))
    url = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    result = run_cli("launch", str(study), "--workers", "1", "--array-size", "3",
                     "--set", "n_trials=4", "--set", "pruner=none")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _load(url)
    # The member that joined last, mid-way through the order (batch_start > 0) where there is one.
    member = max(trials, key=lambda t: (record.ARRAY.get(t)["batch_start"], t.number))
    assert record.ARRAY.get(member)["batch_start"] > 0, "the fourth trial refilled the array mid-order"
    # Its retry, as a dead worker's would be queued; a worker runs it alone (a retry never joins).
    loaded = optuna.load_study(study_name="tiny", storage=url)
    worker.RetryCallback(3)(loaded, member)
    sweep = load_sweep(study, [f"storage={url}", "n_trials=4", "pruner=none", "array_size=3"])
    code = worker.run(sweep, url, WorkerInfo(index=5), heartbeat_interval=1, grace_period=6)
    assert code == worker.EXIT_DONE
    [retry] = [t for t in _load(url) if record.RETRY_HISTORY.get(t) == [member.number]]
    assert retry.state == TrialState.COMPLETE and retry.params == member.params
    assert record.ARRAY.get(retry) == record.ARRAY.get(member), "the retry keeps the member's place"
    assert record.DEVICES.get(retry) == 1, "it trained alone"
    assert retry.intermediate_values == pytest.approx(member.intermediate_values, rel=1e-5)
    assert retry.value == pytest.approx(member.value, rel=1e-5)


def _members_mid_training(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The running members of one array that have all saved a resume state, and still have
    most of their evaluations ahead."""
    running = [t for t in trials if t.state == TrialState.RUNNING and record.ARRAY.get(t)]
    ready = [t for t in running if record.RESUME.get(t) and t.user_attrs.get("progress", {}).get("evaluation", 99) <= 3]
    return ready if len(ready) >= 2 and len(ready) == len(running) else []


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.long
def test_kill_9_mid_array_retries_every_member_from_its_own_state(tmp_path: Path) -> None:
    study = write_study(tmp_path, ARRAY_STUDY)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    sets = ["n_trials=4", "epochs=2", "evals_per_epoch=4", "data.n_train=2400", "space.batch_size=16",
            "pruner=none", "array_size=3"]
    launcher = _launch(study, url, "--workers", "1", *[a for s in sets for a in ("--set", s)])
    watcher = _Watcher(url)
    deadline, victims = time.time() + 180, []
    while time.time() < deadline and not victims and launcher.poll() is None:
        victims = _members_mid_training(watcher.trials())
        time.sleep(0.1)
    watcher.close()
    assert victims, f"no array caught mid-training: {launcher.communicate()[1][-3000:]}"
    saved = {v.number: record.RESUME.get(v)["step"] for v in victims}
    os.kill(record.PID.get(victims[0]), signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    trials = _trials(url)
    tally = budget.tally(trials)
    assert (tally.finished, tally.complete, tally.waiting, tally.running) == (4, 4, 0, 0), "exact budget"
    for number, step in saved.items():
        killed = next(t for t in trials if t.number == number)
        assert killed.state == TrialState.FAIL and "died" in killed.user_attrs["fail_reason"]
        [retry] = [t for t in trials if record.RETRY_HISTORY.get(t) == [number]]
        assert retry.state == TrialState.COMPLETE and retry.params == killed.params
        assert retry.user_attrs["resumed_from_step"] >= step > 0, "continued from its own state"
        assert record.ARRAY.get(retry) == record.ARRAY.get(killed)
        # Its curve up to the kill is the member's own (replayed from the state it saved).
        shared = [k for k in killed.intermediate_values if k in retry.intermediate_values]
        assert shared and all(retry.intermediate_values[k] == killed.intermediate_values[k] for k in shared)
    assert not list((tmp_path / "out" / "artifacts").rglob("resume*")), "no resume state left behind"


def test_what_arrays_cannot_train_is_refused_with_one_line_each(tmp_path: Path) -> None:
    study = write_study(tmp_path, TINY_STUDY)
    result = run_cli("validate", str(study), "--set", "array_size=4", "--set", "pretrain_loss=mlm",
                     "--set", "compile=true")
    assert result.returncode == 2
    assert "trial arrays train with pretrain_loss none or l2sp, not 'mlm'" in result.stderr
    assert "trial arrays run their own stacked layers, not torch.compile" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli("validate", str(study), "--set", "array_size=0").returncode == 2
