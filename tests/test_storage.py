from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from sweeper import budget, storage
from sweeper.errors import SweepError
from tests.helpers import ROOT, TINY_STUDY, run_cli, write_study


def test_url_precedence_is_flag_then_environment_then_study_then_sqlite(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert storage.resolve_url(None, None, out) == f"sqlite:///{(out / 'study.db').resolve()}"
    assert storage.resolve_url(None, "postgresql://s@h/d", out) == "postgresql://s@h/d"
    monkeypatch.setenv("SWEEPER_STORAGE", "postgresql://e@h/d")
    assert storage.resolve_url(None, "postgresql://s@h/d", out) == "postgresql://e@h/d"
    assert storage.resolve_url("postgresql://f@h/d", "postgresql://s@h/d", out) == "postgresql://f@h/d"
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_url("sqlite:///rel.db", None, out) == f"sqlite:///{tmp_path / 'rel.db'}"


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://sweeper:s3cr%40t@db:5432/x", "postgresql+psycopg2://sweeper:***@db:5432/x"),
    ("error at postgresql://u:p@h/d and mysql://a:b@c/d", "error at postgresql://u:***@h/d and mysql://a:***@c/d"),
    ("postgresql://u@h/d", "postgresql://u@h/d"),
])
def test_passwords_are_masked_wherever_a_url_appears(url: str, shown: str) -> None:
    assert storage.mask(url) == shown


def test_a_wrong_password_is_one_line_with_the_password_masked(tmp_path: Path, private_pg) -> None:  # type: ignore[no-untyped-def]
    study = write_study(tmp_path, TINY_STUDY)
    result = run_cli("launch", str(study), "--storage", private_pg.url(password="wrong-pw-123"))
    assert result.returncode == 2
    assert "refused the user name or password" in result.stderr
    assert "wrong-pw-123" not in result.stderr + result.stdout
    assert private_pg.PASSWORD not in result.stderr + result.stdout


@pytest.mark.parametrize("url, message", [
    ("postgresql+psycopg2://postgres:pw@127.0.0.1:1/x", "cannot reach the database"),
    ("postgresql+psycopg2://postgres@127.0.0.1:5432/no_such_database_here", "does not exist"),
    ("nosuchdb://x", "not one SQLAlchemy understands"),
    ("just text", "not a URL"),
])
def test_bad_storage_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        storage.open_storage(url)


def test_sqlite_claims_are_atomic_across_connections(tmp_path: Path) -> None:
    """Two storages on one file: a WAITING trial can be claimed by exactly one of them."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = storage.open_storage(url, heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(study_name="s", storage=first)
    budget.ensure_tickets(study, 1)
    second = storage.open_storage(url, heartbeat_interval=None, grace_period=None)
    [ticket] = study.get_trials(deepcopy=False)
    assert first.set_trial_state_values(ticket._trial_id, TrialState.RUNNING) is True
    assert second.set_trial_state_values(ticket._trial_id, TrialState.RUNNING) is False


def _create_database(admin_url: str) -> str:
    name = f"sweeper_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _terminate_connections(url: str) -> int:
    database = url.rsplit("/", 1)[1]
    admin = sqlalchemy.create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        killed = conn.execute(sqlalchemy.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
        ), {"d": database}).scalar()
    admin.dispose()
    return int(killed or 0)


@pytest.mark.slow
# Six trials of two epochs on two workers: the default run's versions of these outages are the
# smaller sweeps of tests/test_faults.py (a server restart, connections cut again and again).
@pytest.mark.long
@pytest.mark.timeout(400)
@pytest.mark.parametrize("outage", ["restart", "terminate"])
def test_workers_reconnect_after_the_database_goes_away_mid_sweep(tmp_path: Path, private_pg, outage: str) -> None:  # type: ignore[no-untyped-def]
    url = _create_database(private_pg.url())
    study_file = write_study(tmp_path, TINY_STUDY)
    sets = ["n_trials=6", "epochs=2", "evals_per_epoch=4", "data.n_train=800", "pruner=none"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "sweeper", "launch", str(study_file), "--workers", "2",
         *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT, env={**os.environ, "SWEEPER_STORAGE": url}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    opened = None
    deadline = time.time() + 240
    before: dict[int, float] = {}
    last_error: Exception | None = None
    while time.time() < deadline:
        if launcher.poll() is not None:  # it ended before the outage: say why, do not wait on
            pytest.fail(f"the launcher exited with {launcher.returncode} (last read: {last_error!r}): "
                        f"{launcher.communicate()[1][-3000:]}")
        try:
            opened = opened or storage.open_storage(url, heartbeat_interval=None, grace_period=None,
                                                    create_tables=False)
            trials = optuna.load_study(study_name="tiny", storage=opened).get_trials(deepcopy=False)
        except (SweepError, KeyError) as exc:  # not created yet: open afresh next time
            last_error, opened = exc, None
            time.sleep(0.5)
            continue
        before = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
        if before and any(t.state == TrialState.RUNNING for t in trials):
            break
        time.sleep(0.3)
    assert before, f"no trial finished before the outage (last read: {last_error!r})"
    if outage == "restart":
        private_pg.restart()
    else:
        assert _terminate_connections(url) >= 2
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    opened = storage.open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
    trials = optuna.load_study(study_name="tiny", storage=opened).get_trials(deepcopy=False)
    assert {t.number: t.value for t in trials if t.number in before} == before, "nothing finished was lost"
    tally = budget.tally(trials)
    assert (tally.finished, tally.waiting, tally.running) == (6, 0, 0)
    assert private_pg.PASSWORD not in out + err
    opened.engine.dispose()


_OPEN_AT_ONCE = """
import sys, time
from sweeper import storage
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process opens at the same moment
storage.open_storage(sys.argv[1], heartbeat_interval=None, grace_period=None)
"""


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_processes_opening_a_new_database_at_once_all_succeed(backend: str, tmp_path: Path,
                                                              request: pytest.FixtureRequest) -> None:
    # A launcher, a `sweeper worker` on another host and a `status` may all be first: they race
    # to create Optuna's tables and alembic stamp, and the losers must open what the winner made.
    # On SQLite a loser is told "database is locked" at once (a read transaction cannot wait
    # to become a writer) rather than "already exists".
    url = f"sqlite:///{tmp_path / 'new.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    start = time.time() + 3.0
    processes = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, url, str(start)], cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, "\n".join(e[-800:] for e in errors if e)


def test_a_locked_database_inside_optunas_own_error_is_a_lost_schema_race_too() -> None:
    # Seen once in CI: the launcher's first open of a new SQLite file lost to a reader while
    # committing Optuna's version_info row, which Optuna reports as its StorageInternalError.
    from sweeper.storage import _lost_schema_race

    locked = sqlalchemy.exc.OperationalError("INSERT INTO version_info ...", {}, Exception("database is locked"))
    try:
        try:
            raise locked
        except sqlalchemy.exc.OperationalError as cause:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
    except optuna.exceptions.StorageInternalError as wrapped:
        assert _lost_schema_race(wrapped)
    assert not _lost_schema_race(optuna.exceptions.StorageInternalError("disk I/O error"))
    assert not _lost_schema_race(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("no such table: studies")))


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_server_at_its_connection_limit_is_waited_for_not_taken_for_a_wrong_url(pg_url: str) -> None:
    """Issue 17: "too many connections" while a worker started aborted the whole sweep."""
    import threading
    import uuid

    role = f"sweeper_limited_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # Opening nests two connections (Optuna's schema check): room for three, all taken.
        conn.execute(sqlalchemy.text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 3'))
        conn.execute(sqlalchemy.text(f'GRANT ALL ON SCHEMA public TO "{role}"'))
    limited = pg_url.replace("://postgres@", f"://{role}@")
    holder = sqlalchemy.create_engine(limited, poolclass=sqlalchemy.pool.NullPool)
    try:
        held = [holder.connect() for _ in range(3)]  # every connection the role may have
        threading.Timer(2.0, lambda: [c.close() for c in held]).start()
        started = time.monotonic()
        opened = storage.open_storage(limited, heartbeat_interval=None, grace_period=None)
        assert time.monotonic() - started >= 1.5, "it waited for a free connection"
        optuna.create_study(study_name="waited", storage=opened)
        opened.dispose()
    finally:
        holder.dispose()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"), {"r": role})
            conn.execute(sqlalchemy.text(f'DROP OWNED BY "{role}"'))
            conn.execute(sqlalchemy.text(f'DROP ROLE "{role}"'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_worker_opening_during_an_outage_waits_for_the_server(private_pg) -> None:  # type: ignore[no-untyped-def]
    import threading

    private_pg.stop()
    try:
        with pytest.raises(SweepError, match="cannot reach the database"):  # a launch fails at once
            storage.open_storage(private_pg.url(), heartbeat_interval=None, grace_period=None)
        threading.Timer(2.0, private_pg.start).start()
        opened = storage.open_storage(private_pg.url(), heartbeat_interval=None, grace_period=None,
                                      wait_for_server=True)
    finally:
        time.sleep(0.1)
    assert opened.get_all_studies() is not None
    opened.dispose()
