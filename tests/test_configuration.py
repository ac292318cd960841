"""A study carries the configuration it was created with, and a machine that launches or joins
it with another one is refused with one line naming the differences (issue 17.5)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper import configuration, record
from sweeper.errors import SweepError
from sweeper.launcher import LaunchOptions, prepare_study
from sweeper.storage import open_storage
from sweeper.study import load as load_sweep
from tests.helpers import TINY_STUDY, run_cli, write_study


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat_interval=None,
                                                                       grace_period=None, create_tables=False))


def test_differences_name_every_setting_trials_compute_with_and_ignore_where_a_machine_keeps_things(
        tmp_path: Path) -> None:
    study_file = write_study(tmp_path, TINY_STUDY)
    created = configuration.of(load_sweep(str(study_file)))
    joined = configuration.of(load_sweep(str(study_file), [
        "epochs=2", "model.hidden=64", "pruner=hyperband",  # what a trial computes
        "keep=7", "max_retries=1", "n_trials=9", f"output_dir={tmp_path / 'elsewhere'}",  # where, how much
        "storage=postgresql+psycopg2://u:secret@db/x"]))
    assert configuration.differences(created, joined) == [
        "epochs: 1 in the study, 2.0 here", "model.hidden: 32 in the study, 64 here",
        'pruner: "median" in the study, "hyperband" here']
    assert configuration.differences(created, created) == []
    assert joined["storage"] == "postgresql+psycopg2://u:***@db/x"  # recorded masked


def test_a_worker_with_other_settings_is_refused_with_one_line_and_trains_nothing(
        tmp_path: Path, storage_url_postgres_long: str) -> None:
    storage_url = storage_url_postgres_long
    study_file = write_study(tmp_path, TINY_STUDY)
    env = {"SWEEPER_STORAGE": storage_url}
    created = run_cli("create", str(study_file), env=env)
    assert created.returncode == 0, created.stderr
    recorded = record.STUDY_CONFIG.get(_study(storage_url))
    assert recorded == configuration.of(load_sweep(str(study_file)))
    assert "config" not in _study(storage_url).user_attrs  # for machines: not in the dashboard's list

    joining = run_cli("worker", str(study_file), "--set", "epochs=2", "--set", "evals_per_epoch=3", env=env)
    assert joining.returncode == 2, joining.stderr
    line = joining.stderr.strip().splitlines()[-1]
    assert line.startswith("sweeper: error: the study 'tiny' was created with other settings"), line
    assert "epochs: 1 in the study, 2.0 here" in line and "evals_per_epoch: 2 in the study, 3 here" in line
    assert "Traceback" not in joining.stderr

    # A worker started directly (as the launcher and Kubernetes start them) is refused too.
    direct = run_cli("_work", str(study_file), "--index", "0", "--join", "--set", "model.layers=1", env=env)
    assert direct.returncode == 2 and "model.layers: 2 in the study, 1 here" in direct.stderr, direct.stderr[-2000:]

    # Launching the study again with another configuration is refused the same way, before any
    # ticket is added (the budget of the launch below would add 5).
    other = load_sweep(str(study_file), ["pretrain_loss=none"])
    with pytest.raises(SweepError, match='pretrain_loss: "l2sp" in the study, "none" here'):
        prepare_study(other, LaunchOptions(study_path=str(study_file), overrides=[], url=storage_url, n_trials=9))

    study = _study(storage_url)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 4, "nothing trained, claimed or added"
    assert record.STUDY_CONFIG.get(study) == recorded, "the study's configuration is unchanged"
