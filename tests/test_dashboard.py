"""`sweeper dashboard`: the real command serving a finished sweep from SQLite and from
PostgreSQL, checked through optuna-dashboard's HTTP API and in a real headless Chromium."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pytest

from sweeper import dashboard, record
from sweeper import study as study_mod
from sweeper.errors import SweepError
from sweeper.storage import open_storage
from tests.helpers import ROOT

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("finished_sweep")

if TYPE_CHECKING:
    from playwright.sync_api import Browser

# Optuna's state names as optuna-dashboard spells them.
STATES = {"COMPLETE": "Complete", "PRUNED": "Pruned", "FAIL": "Fail", "RUNNING": "Running",
          "WAITING": "Waiting"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_only(url: str) -> optuna.storages.BaseStorage:
    return open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(params=["sqlite", "postgresql"])
def served_url(request: pytest.FixtureRequest, finished_sweep: dict[str, Any]) -> str:
    """The finished sweep's own SQLite file, or the same study copied into PostgreSQL under a URL
    with a password (trust authentication ignores it; it must never be printed)."""
    if request.param == "sqlite":
        return str(finished_sweep["url"])
    pg_url: str = request.getfixturevalue("pg_url")
    url = pg_url.replace("postgres@", "postgres:hunter2@", 1)
    optuna.copy_study(from_study_name="tiny", from_storage=read_only(str(finished_sweep["url"])),
                      to_storage=open_storage(url, heartbeat_interval=None, grace_period=None))
    return url


@pytest.fixture
def running_dashboard(finished_sweep: dict[str, Any], served_url: str) -> Iterator[dict[str, Any]]:
    """`sweeper dashboard` in a subprocess; stopped with Ctrl-C (SIGINT) at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    # A shell that started pytest in the background ignores SIGINT, and a child would inherit
    # that; a handled signal is reset to the default in the child instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sweeper", "dashboard", str(finished_sweep["study"]),
             "--storage", served_url, "--port", str(port)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the address, printed once the port is bound
        assert line, f"the dashboard exited ({process.wait()}): {process.stderr.read() if process.stderr else ''}"
        yield {"process": process, "port": port, "line": line, "url": served_url}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_dashboard_serves_the_study_its_trials_and_their_checkpoints(
        running_dashboard: dict[str, Any], browser: Browser) -> None:
    port, line = running_dashboard["port"], running_dashboard["line"]
    match = re.search(r"at (http://127\.0\.0\.1:(\d+)/dashboard/studies/(\d+))", line)
    assert match and int(match[2]) == port, line
    page_url, study_id = match[1], int(match[3])
    base = f"http://127.0.0.1:{port}"

    study = optuna.load_study(study_name="tiny", storage=read_only(running_dashboard["url"]))
    trials = study.get_trials()

    # The HTTP API: the study, then every trial with its state, value and checkpoint files.
    studies = get_json(f"{base}/api/studies")["study_summaries"]
    assert [(s["study_id"], s["study_name"]) for s in studies] == [(study_id, "tiny")]
    detail = get_json(f"{base}/api/studies/{study_id}")
    assert detail["name"] == "tiny"
    served = {t["number"]: t for t in detail["trials"]}
    assert sorted(served) == [t.number for t in trials]
    for trial in trials:
        assert served[trial.number]["state"] == STATES[trial.state.name]
        if trial.value is not None:
            assert served[trial.number]["values"] == [trial.value]
    best = min((t for t in trials if t.value == study.best_value and record.CHECKPOINT.get(t)),
               key=lambda t: t.number)
    files = record.CHECKPOINT.get(best)["files"]
    artifacts = {a["filename"]: a["artifact_id"] for a in served[best.number]["artifacts"]}
    assert artifacts == {name: f["id"] for name, f in files.items()}
    # ...and the files themselves come from the study's artifact store, intact.
    trial_id = served[best.number]["trial_id"]
    artifact = f"{base}/artifacts/{study_id}/{trial_id}/{files['trial.json']['id']}"
    with urllib.request.urlopen(artifact, timeout=30) as response:
        body = response.read()
    assert hashlib.sha256(body).hexdigest() == files["trial.json"]["sha256"]
    assert json.loads(body)["trial"] == best.number

    # A rendered page: the study and its trials, with the checkpoint beside the best one.
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_url)
        page.get_by_text("tiny (id=").first.wait_for(timeout=30_000)
        page.get_by_text(f"Best Trial (number={best.number})").first.wait_for(timeout=30_000)
        page.goto(f"{base}/dashboard/studies/{study_id}/trials?numbers={best.number}")
        page.get_by_text("model.safetensors").first.wait_for(timeout=30_000)
        text = page.inner_text("body")
        for trial in trials:
            assert f"Trial {trial.number}" in text
        for state in {STATES[t.state.name] for t in trials}:
            assert state in text
    finally:
        context.close()
    assert errors == []

    process = running_dashboard["process"]
    process.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit code 0
    assert process.wait(timeout=20) == 0
    stderr = process.stderr.read()
    assert "dashboard stopped" in stderr and "Traceback" not in stderr
    assert "hunter2" not in line + stderr


@pytest.fixture
def tiny_sweep(finished_sweep: dict[str, Any]) -> Any:
    return study_mod.load(str(finished_sweep["study"]), [])


def test_dashboard_binds_to_loopback_unless_told(tiny_sweep: Any, finished_sweep: dict[str, Any]) -> None:
    board = dashboard.start(tiny_sweep, str(finished_sweep["url"]), port=0)
    try:
        assert board.server.server_address[0] == "127.0.0.1" and board.port > 0
        assert board.url == f"http://127.0.0.1:{board.port}/dashboard/studies/{board.study_id}"
    finally:
        board.close()


def test_dashboard_finds_an_s3_store_recorded_on_the_study(finished_sweep: dict[str, Any], s3_env: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The study file names no store; the study records s3://bucket/prefix (as `launch` does):
    the dashboard on another machine serves the checkpoint files from that bucket."""
    import boto3

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="dashboard")
    url = f"sqlite:///{tmp_path / 'copy.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=read_only(str(finished_sweep["url"])),
                      to_storage=open_storage(url, heartbeat_interval=None, grace_period=None))
    study = optuna.load_study(study_name="tiny", storage=url)
    study.set_user_attr(record.ARTIFACT_STORE.key, "s3://dashboard/sweeps/tiny")
    best = study.best_trial  # keep-top-k may have removed other trials' files by now, never the best's
    assert record.CHECKPOINT.get(best)
    files = record.CHECKPOINT.get(best)["files"]
    for f in files.values():  # the checkpoint as a sweep with that store would have written it
        body = (Path(finished_sweep["output_dir"]) / "artifacts" / f["id"]).read_bytes()
        client.put_object(Bucket="dashboard", Key=f"sweeps/tiny/{f['id']}", Body=body)
    sweep = study_mod.load(str(finished_sweep["study"]), [f"output_dir={tmp_path / 'elsewhere'}"])

    board = dashboard.start(sweep, url, port=0)
    assert board.artifacts == "s3://dashboard/sweeps/tiny"
    serving = threading.Thread(target=board.serve_forever, daemon=True)
    serving.start()
    try:
        base = f"http://127.0.0.1:{board.port}"
        trial_id = next(t["trial_id"] for t in get_json(f"{base}/api/studies/{board.study_id}")["trials"]
                        if t["number"] == best.number)
        artifact = f"{base}/artifacts/{board.study_id}/{trial_id}/{files['model.safetensors']['id']}"
        with urllib.request.urlopen(artifact, timeout=30) as response:
            assert hashlib.sha256(response.read()).hexdigest() == files["model.safetensors"]["sha256"]
    finally:
        board.server.shutdown()
        serving.join(timeout=10)


def test_dashboard_without_its_artifact_folder_still_serves_the_trials(
        finished_sweep: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sweep = study_mod.load(str(finished_sweep["study"]), [f"artifacts={tmp_path / 'gone'}"])
    with caplog.at_level("WARNING", logger="sweeper.dashboard"):
        board = dashboard.start(sweep, str(finished_sweep["url"]), port=0)
    try:
        assert board.artifacts.startswith("none")
        assert f"{tmp_path / 'gone'}' does not exist" in caplog.text
        assert not (tmp_path / "gone").exists()  # a reader creates no empty store
    finally:
        board.close()


def test_dashboard_stops_cleanly_on_sigterm(tiny_sweep: Any, finished_sweep: dict[str, Any]) -> None:
    """`docker stop` and Kubernetes send SIGTERM: the same clean stop as Ctrl-C."""
    board = dashboard.start(tiny_sweep, str(finished_sweep["url"]), port=0)
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        board.serve_forever()
    timer.join()
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handling is back
    with socket.socket() as probe:  # and the port is free again
        probe.bind(("127.0.0.1", board.port))


def test_dashboard_refuses_a_busy_port_in_one_line(tiny_sweep: Any, finished_sweep: dict[str, Any]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SweepError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            dashboard.start(tiny_sweep, str(finished_sweep["url"]), port=port)


def test_dashboard_names_the_studies_a_storage_holds(tiny_sweep: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="someone-else", storage=url)
    with pytest.raises(SweepError, match="'tiny' does not exist .* holds 'someone-else'.*sweeper launch"):
        dashboard.start(tiny_sweep, url, port=0)
    with pytest.raises(SweepError, match="has not started"):
        dashboard.start(tiny_sweep, f"sqlite:///{tmp_path / 'never.db'}", port=0)


def test_dashboard_names_the_extra_to_install(tiny_sweep: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # makes the import fail
    with pytest.raises(SweepError, match=re.escape("pip install 'sweeper[dashboard]'")):
        dashboard.start(tiny_sweep, "sqlite:///unused.db", port=0)
