"""`sweeper status`, checked against the storage it reads: the finished sweep copied into SQLite
and PostgreSQL, plus one trial left running the way a worker leaves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from sweeper import record
from sweeper.storage import open_storage
from tests.helpers import run_cli

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("finished_sweep")

RUNNING_ATTRS = {"worker": 3, "host": "gpu-node-7", "device": "cuda (GPU 2)", "devices": 1,
                 "progress": {"evaluation": 1, "of": 2, "value": 0.5125}}


def copy_with_a_running_trial(finished: dict[str, Any], url: str) -> optuna.Study:
    """The finished study copied to ``url``, with one more trial RUNNING as a worker records it."""
    source = open_storage(str(finished["url"]), heartbeat_interval=None, grace_period=None, create_tables=False)
    target = open_storage(url, heartbeat_interval=None, grace_period=None)
    optuna.copy_study(from_study_name="tiny", from_storage=source, to_storage=target)
    study = optuna.load_study(study_name="tiny", storage=target)
    trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    for key, value in RUNNING_ATTRS.items():
        trial.set_user_attr(key, value)
    trial.report(0.5125, 1)
    return study


def test_status_json_agrees_with_the_storage(finished_sweep: dict[str, Any], storage_url: str) -> None:
    study = copy_with_a_running_trial(finished_sweep, storage_url)
    result = run_cli("status", str(finished_sweep["study"]), "--storage", storage_url, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)

    trials = study.get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert summary["study"] == "tiny" and summary["direction"] == "maximize"
    counts = summary["counts"]
    assert counts["complete"] == len(by_state[TrialState.COMPLETE]) >= 1
    assert counts["pruned"] == len(by_state[TrialState.PRUNED])
    assert counts["failed"] + counts["retried"] == len(by_state[TrialState.FAIL])
    assert counts["running"] == len(by_state[TrialState.RUNNING]) == 1
    assert counts["finished"] == sum(t.state.is_finished() for t in trials)
    assert summary["budget"] == 4

    # The best: Optuna's best value; among ties, the earliest trial (the one `best` hands out).
    best = summary["best"]
    assert best["value"] == study.best_value
    earliest = min(t.number for t in by_state[TrialState.COMPLETE] if t.value == study.best_value)
    assert best["number"] == earliest
    assert best["params"] == study.trials[earliest].params
    assert best["checkpoint"] is True
    assert best["test"] == study.user_attrs["best_test"]  # the held-out figure recorded by finalize

    (running,) = summary["running"]
    assert running["number"] == by_state[TrialState.RUNNING][0].number
    assert (running["worker"], running["host"], running["device"]) == (3, "gpu-node-7", "cuda (GPU 2)")
    assert (running["evaluation"], running["of"], running["last_value"]) == (1, 2, 0.5125)
    assert running["seconds"] is not None and running["seconds"] >= 0

    finished_gpu_s = sum(t.user_attrs.get("gpu_seconds", 0.0) for t in trials if t.state.is_finished())
    assert summary["gpu_hours"] >= round(finished_gpu_s / 3600, 4) > 0
    deleted = {int(k.split(":", 1)[1]) for k in study.user_attrs if k.startswith("checkpoint_deleted:")}
    kept = sorted((t for t in by_state[TrialState.COMPLETE] if record.CHECKPOINT.get(t)
                   and t.number not in deleted), key=lambda t: (-t.value, t.number))
    assert summary["checkpoints_kept"] == [t.number for t in kept]


def test_status_table_shows_states_best_params_and_running_trials(finished_sweep: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'copy.db'}"
    study = copy_with_a_running_trial(finished_sweep, url)
    result = run_cli("status", str(finished_sweep["study"]), "--storage", url)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    best = study.best_trial
    complete = sum(t.state == TrialState.COMPLETE for t in study.trials)
    assert f"{complete} complete" in table and "1 running" in table
    assert f"accuracy {study.best_value:.4f}" in table
    assert f"held-out test accuracy {study.user_attrs['best_test']['value']:.4f}" in table
    for name in best.params:
        assert name in table
    running_line = next(line for line in table.splitlines() if "gpu-node-7" in line)
    assert "cuda (GPU 2)" in running_line and "1/2" in running_line and "0.5125" in running_line


@pytest.mark.parametrize("command", ["status", "report", "dashboard"])
def test_watching_commands_have_help_with_examples(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "examples:" in result.stdout
    assert f"sweeper {command} studies/" in result.stdout
