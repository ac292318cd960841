"""The real `sweeper` command, in subprocesses, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from tests.helpers import ROOT, run_cli

QUICKSTART = str(ROOT / "studies" / "quickstart.py")


@pytest.mark.slow
@pytest.mark.timeout(300)  # 8 trials of 5 epochs on 2 workers, beside the rest of the suite on 2 cores
def test_quickstart_launch_completes_and_prunes_through_the_real_cli(tmp_path: Path) -> None:
    out = f"output_dir={tmp_path}"
    # The README's command with 8 of the study's 12 trials, for the suite's time: enough for
    # Hyperband to prune and for the learning trials to be the majority (5 of 6 complete ones).
    launched = run_cli("launch", QUICKSTART, "--workers", "2", "--set", out, "first_trials=center", "n_trials=8")
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "best trial" in launched.stderr and "held-out test accuracy" in launched.stderr
    best_line = next(line for line in launched.stderr.splitlines() if line.startswith("best trial"))
    assert "'learning_rate'" in best_line and "'batch_size': 32" in best_line  # searched and constant values
    status = run_cli("status", QUICKSTART, "--set", out, "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    counts = summary["counts"]
    assert counts["finished"] == 8 and counts["waiting"] == 0 and counts["running"] == 0
    assert counts["complete"] >= 1 and counts["pruned"] >= 1
    assert 0.0 <= summary["best"]["test"]["value"] <= 1.0  # held-out figure, best trial only
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'study.db'}")
    # Issue 18.1: most trials used to sit at chance (0.5125, the majority class of validation).
    # Most complete trials now learn; the pruner stops most of those that do not.
    values = [t.value for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])]
    assert sum(value >= 0.6 for value in values) > len(values) / 2, values
    assert summary["best"]["value"] >= 0.7
    center = {"learning_rate": (8e-4 * 3e-3) ** 0.5, "weight_decay": 10 ** -3.5, "unfreeze_depth": 1,
              "pretrain_loss_weight": 10 ** -2.5}
    assert study.trials[0].params == pytest.approx(center, rel=1e-3)  # the first trial is the space's middle
    # Issue 18.3: every wait says what it is, from the first launch's preparation to the test score.
    said = launched.stderr.splitlines()
    assert any("preparing 'quickstart' (first launch): building the model and tokenising" in line for line in said)
    assert any(line.endswith("2 workers starting (loading the data and the model)") for line in said)
    scoring = next(k for k, line in enumerate(said) if line.startswith("scoring the best trial"))
    assert said[scoring + 1].startswith("best trial")  # said before the wait, then the result
    pruned = study.get_trials(states=[optuna.trial.TrialState.PRUNED])
    assert pruned and all(t.user_attrs["train_seconds"] > 0 and t.user_attrs["samples_per_second"] > 0
                          for t in pruned)  # a pruned trial keeps the timings of its last evaluation
    table = run_cli("status", QUICKSTART, "--set", out)
    assert f"trial {summary['best']['number']}" in table.stdout


def test_validate_samples_the_space_without_training(tmp_path: Path) -> None:
    result = run_cli("validate", QUICKSTART, "--set", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "a sample" in result.stdout
    assert not (tmp_path / "study.db").exists()


@pytest.mark.parametrize("before", [False, True])
def test_one_set_takes_several_values_before_or_after_the_study(tmp_path: Path, before: bool) -> None:
    # The README's form: `--set model=... data=...`; a study path after them is still the study.
    values = ["--set", f"output_dir={tmp_path}", "epochs=3", "space.unfreeze_depth=1"]
    result = run_cli("validate", *(values + [QUICKSTART] if before else [QUICKSTART] + values))
    assert result.returncode == 0, result.stderr
    assert "3 epochs" in result.stdout and '"unfreeze_depth": 1' in result.stdout
    assert str(tmp_path) in result.stdout


@pytest.mark.parametrize("args, message", [
    (["validate", "studies/nope.py"], "does not exist"),
    (["validate", QUICKSTART, "--set", "epoch=2", "--set", "pruner=x"], "2 problems"),
    (["validate", QUICKSTART, "--set", "space.unfreeze_depth=0..9"], "use 0..2"),
    (["status", QUICKSTART, "--set", "output_dir=/tmp/sweeper-never-launched"], "sweeper launch"),
    (["launch", QUICKSTART, "--storage", "postgresql+psycopg2://u:hunter2@127.0.0.1:1/x"], "cannot reach"),
    (["launch", QUICKSTART, "--storage", "nosuchdb://x"], "not one SQLAlchemy understands"),
    (["validate", "--set", "epochs=1"], "needs the study file"),
])
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sweeper: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_every_command_has_help_that_ends_with_examples() -> None:
    for command in ("validate", "launch", "worker", "status", "best", "dashboard", "report", "create", "proxy",
                    "deploy", "deploy k8s", "env"):
        result = run_cli(*command.split(), "--help")
        assert result.returncode == 0 and "examples:" in result.stdout, command
        examples = result.stdout.rsplit("examples:\n", 1)[1].splitlines()
        assert examples and all(line.startswith("  ") and "sweeper " in line for line in examples), command


@pytest.mark.parametrize("command, flags, expected", [
    ("launch", ["--n-trials", "0", "--workers", "0", "--timeout", "-5"],
     ["`--n-trials` is 0: use a whole number at least 1", "`--workers` is 0: use 1 or more", "`--timeout` is -5"]),
    ("launch", ["--gpu-hours", "-1", "--heartbeat", "20", "--grace", "10"],
     ["`--gpu-hours` is -1", "`--grace` is 10 s, not above the heartbeat interval (20 s)"]),
    ("create", ["--n-trials", "-3"], ["`--n-trials` is -3: use a whole number at least 1"]),
])
def test_bad_budget_and_liveness_options_are_one_line_and_create_nothing(
        tmp_path: Path, command: str, flags: list[str], expected: list[str]) -> None:
    """Issue 17.7: `--n-trials 0`, negative limits, `--workers 0` (silently 1) and a grace
    period a live trial's heartbeat cannot beat were accepted."""
    result = run_cli(command, QUICKSTART, "--set", f"output_dir={tmp_path}", *flags)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("sweeper: error: ") and all(text in line for text in expected), line
    assert not (tmp_path / "study.db").exists(), "nothing was created"
