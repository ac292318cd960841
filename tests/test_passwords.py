"""No password of the storage URL anywhere a person or another user of the machine can read it:
attributes, artifacts, logs, errors, process titles, the dashboard's responses (issue 17.3).

Every way a URL carries a password is used at once, each with its own password, in two real
sweeps on PostgreSQL: the study file's ``storage`` (``user:password@``) and ``SWEEPER_STORAGE``
(``?password=``) in the first; ``--set storage=`` (``?password=``) and ``--storage``
(``user:password@``) in the second. The server trusts 127.0.0.1, so it ignores the passwords,
and a password that reached any output would be found by a plain search for it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_study

PASSWORDS = {"file": "filePw4Study", "env": "envPw4Storage", "set": "setPw4Override", "flag": "flagPw4Storage"}

STUDY = """
    from sweeper import LogFloat, Sweep, SyntheticText, TinyTextClassifier

    sweep = Sweep(
        name="NAME",
        model=TinyTextClassifier(layers=1, hidden=16, heads=2),
        data=SyntheticText(n_train=128, n_test=64),
        space={"learning_rate": LogFloat(1e-4, 1e-2), "batch_size": 32},
        epochs=1,
        n_trials=2,
        keep=1,
        storage="STORAGE",
        output_dir="OUTPUT_DIR",
    )
"""


def _with_userinfo(url: str, password: str) -> str:
    return url.replace("postgres@", f"postgres:{password}@", 1)


def _with_keyword(url: str, password: str) -> str:
    return f"{url}?password={password}"


class TitleWatch:
    """Every process title on the machine, sampled every 50 ms: the ones that show a password."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.done.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        continue
                    if any(p in title for p in PASSWORDS.values()):
                        self.seen.add(title)
            self.done.wait(0.05)

    def __enter__(self) -> TitleWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=10)


def _launch(args: list[str], env: dict[str, str]) -> tuple[str, set[str]]:
    """`sweeper launch` in a subprocess: its whole output, and the titles that showed a password
    from the moment it said it is launching (a title is the process's own until then)."""
    full_env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"} | env
    process = subprocess.Popen([sys.executable, "-m", "sweeper", "launch", *args, "--workers", "1"],
                               cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "launching" in line:
            break
    with TitleWatch() as watch:
        lines.extend(process.stdout)
        code = process.wait(timeout=240)
    output = "".join(lines)
    assert code == 0, output[-3000:]
    return output, watch.seen


def _run_at_once(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several `sweeper` commands that only read the finished sweeps, run side by side (each
    spends most of its time importing), with run_cli's environment."""
    env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    started = [subprocess.Popen([sys.executable, "-m", "sweeper", *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    done = []
    try:
        for args, process in zip(commands, started):
            out, err = process.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return done


def _found(text: str) -> list[str]:
    return [name for name, password in PASSWORDS.items() if password in text]


def _files_with_passwords(folder: Path, study_files: tuple[Path, ...]) -> list[str]:
    """Every file under ``folder`` that holds a password, but the study files (which hold theirs)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and p not in study_files
            and _found(p.read_bytes().decode(errors="replace"))]


def _dump(database_url: str) -> str:
    """Everything the database holds, as pg_dump writes it: every attribute of every study and trial."""
    name = database_url.rsplit("/", 1)[1]
    done = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", name], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "trial_user_attributes" in done.stdout
    return done.stdout


def _dashboard_responses(study: Path, url: str) -> str:
    """The dashboard's first line and its API's answers for every study it serves."""
    port_probe = subprocess.run([sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0));"
                                 " print(s.getsockname()[1])"], capture_output=True, text=True)
    port = int(port_probe.stdout)
    env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([sys.executable, "-m", "sweeper", "dashboard", str(study), "--storage", url,
                                    "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert process.stdout is not None
        answers = [process.stdout.readline()]
        assert answers[0], process.stderr.read() if process.stderr else ""
        base = f"http://127.0.0.1:{port}/api/studies"
        with urllib.request.urlopen(base, timeout=30) as response:
            listing = response.read().decode()
        answers.append(listing)
        for summary in json.loads(listing)["study_summaries"]:
            with urllib.request.urlopen(f"{base}/{summary['study_id']}", timeout=30) as response:
                answers.append(response.read().decode())
        return "\n".join(answers)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.timeout(400)
@pytest.mark.long
def test_no_password_reaches_attributes_artifacts_logs_titles_or_the_dashboard(tmp_path: Path, pg_url: str) -> None:
    # Sweep 1: the study file's URL (user:password@) and, above it, SWEEPER_STORAGE (?password=).
    first = tmp_path / "first"
    first.mkdir()
    study_one = write_study(first, STUDY.replace("NAME", "one").replace(
        "STORAGE", _with_userinfo(pg_url, PASSWORDS["file"])))
    out_one, titles_one = _launch([str(study_one)], {"SWEEPER_STORAGE": _with_keyword(pg_url, PASSWORDS["env"])})

    # Sweep 2: --set storage= (?password=) and, above it, --storage (user:password@).
    second = tmp_path / "second"
    second.mkdir()
    study_two = write_study(second, STUDY.replace("NAME", "two").replace("STORAGE", pg_url))
    out_two, titles_two = _launch(
        [str(study_two), "--set", f"storage={_with_keyword(pg_url, PASSWORDS['set'])}",
         "--storage", _with_userinfo(pg_url, PASSWORDS["flag"])], {})
    assert "***" in out_one and "***" in out_two  # the launch line names the storage, masked

    flag_url = _with_userinfo(pg_url, PASSWORDS["flag"])
    # The readers run on a thread while the dashboard, which sets a signal handler, runs here.
    with ThreadPoolExecutor(max_workers=1) as pool:
        readers = pool.submit(
            _run_at_once,
            ["status", str(study_one), "--storage", flag_url],
            ["best", str(study_one), "--storage", flag_url, "--out", str(tmp_path / "best")],
            ["status", str(study_one), "--storage",  # an error that quotes the URL
             _with_userinfo(pg_url.rsplit("/", 1)[0] + "/no_such_database", PASSWORDS["flag"])])
        dashboard = _dashboard_responses(study_one, flag_url)
        status, best, bad = readers.result()
    assert status.returncode == 0 and best.returncode == 0, status.stderr + best.stderr
    assert bad.returncode == 2 and "no_such_database" in bad.stderr, bad.stderr

    leaks = {
        "launch output": _found(out_one + out_two),
        "process titles": sorted(titles_one | titles_two),
        "files (logs, artifacts, checkpoints, caches, the best folder)":
            _files_with_passwords(tmp_path, (study_one, study_two)),
        "status, best and an error": _found(status.stdout + status.stderr + best.stdout + best.stderr + bad.stderr),
        "the database (every attribute)": _found(_dump(pg_url)),
        "the dashboard": _found(dashboard),
    }
    assert not any(leaks.values()), {where: found for where, found in leaks.items() if found}
    # And the searches above could find one: the study file itself holds its password.
    assert _found(study_one.read_text()) == ["file"]
    assert re.search(r"trial \d+: validation", best.stdout), best.stdout
