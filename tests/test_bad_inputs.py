"""Bad inputs a user can type, each answered with one line and exit code 2 (issue 17.8).

Through the real ``sweeper`` entry point (``cli.main``), in this process: a traceback would
fail the test as an exception, and each case costs milliseconds instead of an interpreter.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sweeper import cli, record
from sweeper.errors import SweepError
from tests.helpers import TINY_STUDY, write_study


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``sweeper ARGV``; assert exit code 2 and one line on stderr; return that line."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("sweeper: error: "), err
    return lines[0]


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return write_study(tmp_path, TINY_STUDY)


# --------------------------------------------------------------------------- ports and --out


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_dashboard_port_out_of_range_is_one_line(study: Path, port: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "dashboard", str(study), "--port", port)
    assert f"`--port` is {port}: use a port from 1 to 65535" in line


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "`--port` is 70000"),
    (["--threads", "0"], "`--threads` is 0: use 1 or more"),
    (["--grace", "-1"], "`--grace` is -1 s"),
])
def test_bad_proxy_options_are_one_line_before_anything_is_served(
        tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "proxy", "--storage", f"sqlite:///{tmp_path / 'p.db'}", *flags)
    assert message in line


def test_a_deploy_out_that_is_a_file_is_one_line(study: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "manifests"
    existing.write_text("not a folder")
    line = _one_line_error(capsys, "deploy", "k8s", str(study), "--workers", "1", "--out", str(existing))
    assert "is a file: give a folder" in line
    assert existing.read_text() == "not a folder", "the file is left as it was"


def test_a_report_out_under_a_file_is_one_line(study: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    line = _one_line_error(capsys, "report", str(study), "--out", str(tmp_path / "afile" / "r.html"))
    assert "lies under" in line and "which is a file" in line


def test_the_out_check_for_best_refuses_a_file_and_accepts_a_folder_to_make(tmp_path: Path) -> None:
    """`best --out` is wired by its owner; the check itself is shared and tested here."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(SweepError, match="is a file"):
        cli.check_out(tmp_path / "afile", folder=True)
    with pytest.raises(SweepError, match="lies under"):
        cli.check_out(tmp_path / "afile" / "best", folder=True)
    cli.check_out(tmp_path / "new" / "best", folder=True)  # created later by `best`: fine
    cli.check_out(tmp_path / "afile", folder=False)  # a report file may be overwritten


# --------------------------------------------------------------------------- the study name


@pytest.mark.parametrize("name", ["../x", "a/b", "", "a\x00b", ".hidden", "x" * 101])
def test_a_study_name_that_is_not_a_safe_folder_name_is_refused(
        study: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "validate", str(study), "--set", f"name={name}")
    assert "`name` is" in line and "letters, digits" in line


def test_a_study_file_whose_name_climbs_out_of_its_folder_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    climbing = write_study(tmp_path, TINY_STUDY.replace('name="tiny"', 'name="../../etc"'))
    line = _one_line_error(capsys, "validate", str(climbing))
    assert "'../../etc'" in line
    assert not (tmp_path / "out").exists()


def test_ordinary_names_still_load(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("bert-sst2", "run_7.b", "A1"):
        assert cli.main(["validate", str(study), "--set", f"name={name}"]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- storage URLs


def test_a_bare_postgresql_url_uses_the_driver_that_is_installed(
        study: Path, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; sweeper installs psycopg2. The advice
    used to be to install `sweeper[postgres]`, which was installed already."""
    bare = pg_url.replace("postgresql+psycopg2://", "postgresql://")
    assert cli.main(["create", str(study), "--storage", bare, "--n-trials", "2"]) == 0, capsys.readouterr().err
    heroku = pg_url.replace("postgresql+psycopg2://", "postgres://")
    assert cli.main(["create", str(study), "--storage", heroku, "--n-trials", "2"]) == 0, capsys.readouterr().err
    assert len(optuna.load_study(study_name="tiny", storage=pg_url).get_trials()) == 2


def test_a_driver_that_is_not_installed_is_named_with_what_to_do(
        study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "create", str(study), "--storage", "postgresql+psycopg://u@127.0.0.1:1/db")
    assert "'psycopg'" in line and "postgresql+psycopg2://" in line
    assert "install 'sweeper[postgres]'" not in line.split(", or use")[0]


@pytest.mark.parametrize("url, message", [
    ("foo://bar", "not one SQLAlchemy understands"),
    ("sqlite:////proc/no/such/study.db", "cannot create the folder of the SQLite file"),
    ("just words", None),  # a bare path is an SQLite file; with a space it is still a path
])
def test_storage_urls_that_cannot_work_are_one_line(study: Path, tmp_path: Path, url: str, message: str | None,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if message is None:
        assert cli.main(["create", str(study), "--storage", url, "--n-trials", "1"]) == 0
        assert (tmp_path / "just words").exists()
        return
    assert message in _one_line_error(capsys, "create", str(study), "--storage", url)


# --------------------------------------------------------------------------- study files and --set


def test_a_study_file_with_a_nul_byte_names_no_line_number(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.py"
    broken.write_bytes(b"sweep = 1\x00\n")
    line = _one_line_error(capsys, "validate", str(broken))
    assert ":None" not in line and "null bytes" in line


@pytest.mark.parametrize("sets, message", [
    (["nokey=1"], "`nokey` is not a setting"),
    (["epochs=abc"], "`epochs=abc`: expected float"),
    (["keep=-1"], "`keep` is -1"),
    (["n_trials=0", "seed=1.5"], "2 problems"),
])
def test_bad_set_values_are_listed_in_one_line(study: Path, sets: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["validate", str(study)] + [arg for item in sets for arg in ("--set", item)]
    assert message in _one_line_error(capsys, *argv)


def test_a_folder_given_as_the_study_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "it is a folder" in _one_line_error(capsys, "validate", str(tmp_path))


@pytest.mark.parametrize("flags, message", [
    (["--keep", "-1"], "`keep` is -1"),
    (["--workers", "0"], "`--workers` is 0"),
    (["--n-trials", "-5"], "--n-trials"),
])
def test_bad_launch_options_are_one_line(study: Path, flags: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert message in _one_line_error(capsys, "launch", str(study), *flags)


# --------------------------------------------------------------------------- the budget (issue 17.7)


def test_create_with_a_smaller_budget_says_the_budget_that_stays(study: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli.main(["create", str(study), "--storage", url, "--n-trials", "6"]) == 0
    capsys.readouterr()
    assert cli.main(["create", str(study), "--storage", url, "--n-trials", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    assert "with a budget of 6 trials" in out[0] and "budget stays 6" in out[0]
    assert "raise it with --n-trials above 6" in out[0]
    study_ = optuna.load_study(study_name="tiny", storage=url)
    assert len(study_.get_trials()) == 6
    assert record.N_TRIALS.get(study_) == 6, "the study records the budget in effect, not the one asked for"


@pytest.mark.parametrize("gpus", [",", " , ", ""])
def test_gpus_that_name_no_gpu_are_one_line_not_a_quiet_cpu_run(study: Path, gpus: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "launch", str(study), "--gpus", gpus, "--storage", f"sqlite:///{tmp_path / 'db'}")
    assert "names no GPU" in line and "leave out --gpus" in line
    assert not (tmp_path / "db").exists(), "refused before anything was created"


def test_an_empty_image_for_kubernetes_is_one_line(study: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, "deploy", "k8s", str(study), "--workers", "2", "--image", " ", "--out", str(tmp_path / "k8s"))
    assert "--image is empty" in line
    assert not (tmp_path / "k8s").exists() or not any((tmp_path / "k8s").iterdir())
