"""Shared fixtures: tiny models, study files in a temporary folder, and a fresh PostgreSQL
database per test (on 127.0.0.1:5432, as here and in CI)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite runs on two xdist workers (pyproject's addopts), each starting worker processes of
# its own: one thread per process keeps them from fighting over the cores (the tiny models gain
# nothing from more). Set before torch is imported, and inherited by every subprocess.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SWEEPER_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get("SWEEPER_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the tiny models of the whole run (they are built once)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def _no_storage_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)


def _pg_admin_engine():  # type: ignore[no-untyped-def]
    import sqlalchemy

    return sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards. Fails (never skips) when the
    server is unreachable: these tests must run in CI."""
    import sqlalchemy

    engine = _pg_admin_engine()
    name = f"sweeper_test_{uuid.uuid4().hex[:10]}"
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
            ), {"n": name})
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against the embedded default and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.long])])
def storage_url_postgres_long(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """As ``storage_url``, for a real sweep of many seconds: its PostgreSQL side runs with the
    long tests (CI runs both), so that the default run stays near five minutes."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")




@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """A small real sweep, run once through the real CLI and shared by the tests that only
    read a finished study (status, best, report, dashboard). Do not write to it."""
    from tests.helpers import TINY_STUDY, run_cli, write_study

    folder = tmp_path_factory.mktemp("finished")
    study = write_study(folder, TINY_STUDY)
    result = run_cli("launch", str(study), "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"study": study, "output_dir": folder / "out", "url": f"sqlite:///{folder / 'out' / 'study.db'}"}


from typing import TYPE_CHECKING  # noqa: E402 (appended with the browser fixture)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = os.environ.get("SWEEPER_TEST_CHROMIUM", "/usr/bin/chromium")
# Headless, and quiet on the network: without these flags Chromium's own background connections
# are refused by a closed network and reported as errors.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (no browser download). Fails, never skips, when
    either is missing: the report and dashboard tests are how those features are shown."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is not at {CHROMIUM}: apt-get install chromium (or set SWEEPER_TEST_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need playwright: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class PrivatePostgres:
    """A PostgreSQL server of the test's own, with password authentication, that a test may
    restart or stop without disturbing anyone else's database."""

    BIN = Path("/usr/lib/postgresql/15/bin")
    PASSWORD = "correct-horse-battery"

    def __init__(self, folder: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "server.log"

    def _as_postgres(self, *command: str) -> None:
        import subprocess

        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        # Output to a file, not a pipe: the server pg_ctl starts would hold a pipe open forever.
        with open(self.folder / "command.log", "a") as out:
            done = subprocess.run([*prefix, *command], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                  timeout=120)
        if done.returncode:
            tail = (self.folder / "command.log").read_text()[-500:]
            raise RuntimeError(f"{Path(command[0]).name} failed: {tail}")

    def init(self) -> None:
        import shutil

        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "pw").write_text(self.PASSWORD)
        (self.folder / "command.log").touch()
        if os.geteuid() == 0:
            for path in (self.folder, self.folder / "pw", self.folder / "command.log"):
                shutil.chown(path, "postgres", "postgres")
        self._as_postgres(str(self.BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                          "--auth=scram-sha-256", f"--pwfile={self.folder / 'pw'}")
        self.start()

    def start(self) -> None:
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                          "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self._as_postgres(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                          "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "restart")

    def url(self, password: str | None = None, database: str = "postgres") -> str:
        return (f"postgresql+psycopg2://postgres:{password or self.PASSWORD}@127.0.0.1:{self.port}/{database}")


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    import shutil
    import tempfile

    # Outside pytest's temporary folders: those are private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="sweeper-pg-"))
    server = PrivatePostgres(folder)
    try:
        server.init()
    except Exception as exc:  # noqa: BLE001 - any failure here means the tests cannot run
        pytest.fail(f"cannot start a private PostgreSQL server for the test: {exc}")
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A real S3 API on loopback (moto in server mode, in a thread of the test process), for
    the artifact-store tests. Yields the environment a process needs to reach it; each test
    makes its own bucket."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "sweeper-test",
               "AWS_SECRET_ACCESS_KEY": "sweeper-test", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        server.stop()
