"""Issue 18, the first hour of a new user: what a finished sweep says when launched again, the
help texts and usage lines, device-hours named after the device, and `best --evaluate`'s line.

The quickstart's own run (its trials above chance, and the progress lines from the first one to
the held-out score) is the one in tests/test_cli.py, which already runs it through the real CLI.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest

from sweeper import best, cli, record, report, status
from sweeper import study as study_mod
from sweeper.launcher import LaunchOptions, finish_spent_budget
from sweeper.storage import open_storage
from tests.helpers import run_cli

# The finished sweep is built once for the tests that read it (as test_status.py and test_report.py).
pytestmark = pytest.mark.xdist_group("finished_sweep")


def load_finished(finished: dict[str, Any], url: str | None = None) -> tuple[Any, optuna.Study]:
    sweep = study_mod.load(str(finished["study"]), [])
    storage = open_storage(url or str(finished["url"]), heartbeat_interval=None, grace_period=None,
                           create_tables=False)
    return sweep, optuna.load_study(study_name=sweep.name, storage=storage)


# --------------------------------------------------------------------------- 18.5: launched again


def test_a_finished_sweep_launched_again_says_its_budget_is_spent_and_starts_no_worker(
        finished_sweep: dict[str, Any]) -> None:
    logs = Path(finished_sweep["output_dir"]) / "logs"
    logged = {log.name: log.stat().st_size for log in logs.glob("worker-*.log")}
    result = run_cli("launch", str(finished_sweep["study"]), "--workers", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = [text for text in result.stderr.splitlines() if "spent its budget" in text]
    assert "4 of 4 trials finished" in line and "no worker was started" in line
    assert f"`sweeper launch {finished_sweep['study']} --n-trials 8`" in line  # the real flag, copy-paste
    lines = result.stderr.splitlines()
    assert not [text for text in lines if text.startswith(("sweeper: launching", "best trial", "0/4 done"))], lines
    assert {log.name: log.stat().st_size for log in logs.glob("worker-*.log")} == logged
    _, study = load_finished(finished_sweep)
    assert len(study.trials) == 4  # nothing was queued


def test_a_larger_budget_or_a_new_study_is_launched_as_usual(finished_sweep: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "study.db"  # a copy: the shared finished sweep is only read
    shutil.copy(Path(finished_sweep["output_dir"]) / "study.db", copy)
    sweep = study_mod.load(str(finished_sweep["study"]), [])
    said: list[str] = []

    def options(url: str, n_trials: int | None = None) -> LaunchOptions:
        return LaunchOptions(study_path=str(finished_sweep["study"]), overrides=["epochs=1"],
                             url=url, n_trials=n_trials)

    assert finish_spent_budget(sweep, options(f"sqlite:///{copy}", n_trials=6), said.append) is None
    missing = tmp_path / "none" / "study.db"
    assert finish_spent_budget(sweep, options(f"sqlite:///{missing}"), said.append) is None
    assert said == [] and not missing.parent.exists()  # nothing said, nothing created
    assert finish_spent_budget(sweep, options(f"sqlite:///{copy}"), said.append) == 0
    assert said[0].endswith(f"`sweeper launch {finished_sweep['study']} --set epochs=1 --n-trials 8`")


# --------------------------------------------------------------------------- 18.8: help and usage


def subparsers(parser: argparse.ArgumentParser, name: str = "sweeper") -> dict[str, argparse.ArgumentParser]:
    """Every command and subcommand under ``parser``, by its full name."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                found[f"{name} {command}"] = sub
                found.update(subparsers(sub, f"{name} {command}"))
    return found


def test_every_command_and_subcommand_has_a_description() -> None:
    commands = subparsers(cli.build_parser())
    assert {"sweeper status", "sweeper env", "sweeper deploy", "sweeper deploy k8s"} <= set(commands)
    missing = [name for name, parser in commands.items() if not (parser.description or "").strip()]
    assert missing == []


@pytest.mark.parametrize("argv, usage, example", [
    (["status"], "usage: sweeper status ", "`sweeper status studies/quickstart.py`"),
    (["launch", "--set", "epochs=1"], "usage: sweeper launch ", "`sweeper launch studies/quickstart.py --workers 2`"),
    (["deploy", "k8s", "--workers", "2"], "usage: sweeper deploy k8s ", "`sweeper deploy k8s studies/bert_sst2.py"),
])
def test_a_missing_study_shows_the_commands_own_usage_and_example(
        argv: list[str], usage: str, example: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err  # not the top level's `usage: sweeper [-h] [--version] COMMAND`
    [line] = [text for text in err.splitlines() if text.startswith("sweeper: error:")]
    assert "needs the study file" in line and example in line


# --------------------------------------------------------------------------- 18.6: what was measured


def test_status_and_report_name_cpu_hours_on_a_cpu_run(finished_sweep: dict[str, Any]) -> None:
    sweep, study = load_finished(finished_sweep)
    summary = status.summarize(study, sweep)
    assert summary["hours_unit"] == "CPU-hours" and summary["gpu_hours"] > 0
    table = status.render(summary)  # what `sweeper status` prints
    [spent] = [line for line in table.splitlines() if line.startswith("spent")]
    assert spent.endswith(" CPU-hours") and "GPU" not in table
    figure = report._gpu_hours(study.get_trials())
    assert "CPU-hours in finished trials" in figure.layout.title.text
    assert figure.layout.yaxis.title.text == "CPU-hours, cumulative"


@pytest.mark.parametrize("devices, unit", [
    (["cuda:0", "cuda (GPU 3)"], "GPU-hours"),
    (["cpu", "cpu"], "CPU-hours"),
    (["cpu", "cuda:0"], "device-hours"),
    ([], "device-hours"),  # nothing has run yet
])
def test_the_hours_are_named_after_the_devices_the_trials_ran_on(devices: list[str], unit: str) -> None:
    trials = [optuna.trial.create_trial(value=0.5, user_attrs={record.DEVICE.key: device}) for device in devices]
    assert status.hours_unit(trials) == unit


# --------------------------------------------------------------------------- 18.7: best --evaluate


def test_best_evaluate_says_it_reuses_the_recorded_test_figure(finished_sweep: dict[str, Any], tmp_path: Path) -> None:
    sweep, study = load_finished(finished_sweep)
    chosen = best.choose(sweep, study)
    recorded = record.TEST.get(study, chosen.number)
    assert recorded is not None  # the sweep's end scored the best trial
    line = best.export(sweep, study, tmp_path / "evaluated", evaluate=True)
    assert f"held-out test accuracy {recorded['accuracy']:.4f} (recorded on the study" in line
    assert "not scored again" in line
    metrics = json.loads((tmp_path / "evaluated" / "metrics.json").read_text())
    assert metrics["test"] == recorded
    plain = best.export(sweep, study, tmp_path / "plain")
    assert "held-out test accuracy" in plain and "not scored again" not in plain  # only --evaluate asked for a score
