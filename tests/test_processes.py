"""Workers forked from the template process: the same results as fresh interpreters, and every
way the template can go wrong costs import time, never a trial."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper import __version__, processes, record
from sweeper.errors import SweepError
from tests.helpers import ROOT, TINY_STUDY, run_cli, write_study
from tests.test_launcher import _caught_mid_trial, _mid_training, _retry_of, _trials, _wait_for


def _trial_record(url: str) -> list[tuple[int, str, float | None, dict]]:  # type: ignore[type-arg]
    study = optuna.load_study(study_name="tiny", storage=url)
    return [(t.number, t.state.name, t.value, t.params) for t in study.trials]


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.long
def test_workers_forked_from_the_template_compute_what_fresh_interpreters_compute(tmp_path: Path) -> None:
    """The same sweep twice: with workers forked from the template, and with a template that
    touched CUDA, whose workers therefore start as fresh interpreters (exec, as
    SWEEPER_WORKER_START=fresh would start them). One worker, so that the sampler sees the
    trials in the same order both times. The two sweeps are apart (folders, storages) and run
    at once: the test's time is one launch's, not two."""
    records, logs, launches = {}, {}, {}
    for case, env in (("forked", {}), ("fresh", {processes.ENV_PRELOAD: "tests.template_probes.touches_cuda"})):
        folder = tmp_path / case
        folder.mkdir()
        study = write_study(folder, TINY_STUDY)
        launches[case] = subprocess.Popen(
            [sys.executable, "-m", "sweeper", "launch", str(study), "--workers", "1", "--set", "n_trials=3"],
            cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"} | env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for case, launch in launches.items():
            _, err = launch.communicate(timeout=240)
            assert launch.returncode == 0, err[-3000:]
            folder = tmp_path / case
            records[case] = _trial_record(f"sqlite:///{folder / 'out' / 'study.db'}")
            logs[case] = (folder / "out" / "logs" / "worker-0.log").read_text()
    finally:  # a failed first launch leaves no second one running
        for launch in launches.values():
            if launch.poll() is None:
                launch.kill()
                launch.communicate()
    assert records["forked"] == records["fresh"]
    assert len(records["forked"]) == 3 and all(state != "FAIL" for _, state, _, _ in records["forked"])
    for log in logs.values():  # the worker's own lines went to its log
        assert "worker 0 starts trial 2" in log
    assert "starts as a fresh interpreter instead" not in logs["forked"]
    assert logs["fresh"].count("starts as a fresh interpreter instead") == 1


@pytest.mark.slow
@pytest.mark.long
def test_a_template_that_dies_while_importing_leaves_the_workers_to_fresh_interpreters(tmp_path: Path) -> None:
    study = write_study(tmp_path, TINY_STUDY)
    result = run_cli("launch", str(study), "--workers", "1", "--set", "n_trials=2",
                     env={processes.ENV_PRELOAD: "tests.template_probes.dies"})
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "worker template cannot start workers" in line]
    assert len(warnings) == 1 and "SWEEPER_WORKER_START=fresh" in warnings[0]
    states = [state for _, state, _, _ in _trial_record(f"sqlite:///{tmp_path / 'out' / 'study.db'}")]
    assert len(states) == 2 and "FAIL" not in states


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.long
def test_a_dead_template_neither_fails_its_running_workers_nor_stops_restarts(tmp_path: Path) -> None:
    url, launcher, first = _caught_mid_trial(tmp_path)
    worker = record.PID.get(first)
    template = _parent_of(worker)
    assert template not in (launcher.pid, os.getpid())
    os.kill(template, signal.SIGKILL)
    # The worker goes on: its trial finishes as it would have, and it claims the next.
    later = _wait_for(url, lambda t: t.number > first.number and _mid_training(t), launcher)
    assert record.PID.get(later) == worker
    os.kill(worker, signal.SIGKILL)  # now a restart, which needs a new template
    out, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    assert err.count("restarting it") == 1
    trials = {t.number: t for t in _trials(url)}
    assert trials[first.number].state == TrialState.COMPLETE and "fail_reason" not in trials[first.number].user_attrs
    assert trials[later.number].state == TrialState.FAIL and "died" in trials[later.number].user_attrs["fail_reason"]
    retry = _retry_of(list(trials.values()), later.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_step"] > 0
    assert record.PID.get(retry) != worker


def test_an_unknown_start_mode_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(processes.ENV_START, "threads")
    with pytest.raises(SweepError, match="SWEEPER_WORKER_START is 'threads': use template .* or fresh"):
        processes.starter()


def test_the_template_imports_sweepers_modules_and_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(processes.ENV_PRELOAD, "my_tokenizers, peft,torchvision")
    chosen = processes.starter()
    assert isinstance(chosen, processes.TemplateStarter)
    assert chosen.imports == [*processes.CORE_IMPORTS, *processes.MODEL_IMPORTS, "my_tokenizers", "peft"]
    monkeypatch.setenv(processes.ENV_START, "fresh")
    assert isinstance(processes.starter(), processes.FreshStarter)


def test_a_zombie_or_a_vanished_process_is_not_running() -> None:
    assert processes._running(os.getpid())
    child = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while processes._running(child.pid) and time.time() < deadline:
        time.sleep(0.05)  # it exits, and stays a zombie until it is waited for
    assert not processes._running(child.pid)
    child.wait()
    assert not processes._running(child.pid)


def test_a_template_that_cannot_start_leaves_each_worker_to_a_new_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from multiprocessing import forkserver

    def no_room() -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(forkserver, "ensure_running", no_room)
    starter = processes.TemplateStarter()
    starter.warm_up()
    logs = [tmp_path / f"worker-{k}.log" for k in range(2)]
    started = [starter.start(["--version"], dict(os.environ), log) for log in logs]
    assert all(isinstance(process, subprocess.Popen) for process in started)
    for process, log in zip(started, logs):
        assert process.wait(timeout=60) == 0
        assert log.read_text().startswith("sweeper ")  # the worker's output went to its log
    [warning] = [r.getMessage() for r in caplog.records if "cannot start workers" in r.getMessage()]
    assert "No space left on device" in warning and "SWEEPER_WORKER_START=fresh" in warning


def test_a_forked_worker_runs_what_python_m_sweeper_runs_into_its_log_with_its_exit_code(tmp_path: Path) -> None:
    """The first code of a forked worker, in a process of its own here (it takes over the
    process's session and output), as the template's child runs it."""
    code = ("import os, sys; from sweeper import processes; "
            "processes._forked_main(sys.argv[2:], dict(os.environ), sys.argv[1])")
    for argv, exit_code, output in ((["--version"], 0, f"sweeper {__version__}"),
                                    (["nope"], 2, "sweeper: error: argument COMMAND: invalid choice: 'nope'")):
        log = tmp_path / f"{argv[0]}.log"
        result = subprocess.run([sys.executable, "-c", code, str(log), *argv], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == exit_code, log.read_text()
        assert output in log.read_text() and result.stdout == result.stderr == ""


def test_processes_names_the_command_it_starts_and_imports_nothing_above_it() -> None:
    """The layers are acyclic: the CLI starts the launcher, the launcher starts workers through
    this module, and a worker finds the command by its name (`python -m sweeper`), not an import."""
    tree = ast.parse(Path(processes.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
    above = ("sweeper.cli", "sweeper.__main__", "sweeper.launcher")
    assert not [name for name in imported if name.startswith(above)], imported
    assert processes.worker_command(["status"])[1:] == ["-m", processes.PROGRAM, "status"]
