"""Where a sweep's trials live: URL resolution, engine settings, and errors a person can read.

The URL comes from ``--storage``, else ``SWEEPER_STORAGE``, else the study's ``storage``,
else an embedded SQLite file in the study's output folder. The same code serves all of them;
only the engine settings differ:

- SQLite (one machine): WAL journal, a generous busy timeout, and every transaction opened
  with ``BEGIN IMMEDIATE``. Without that, pysqlite starts a transaction only at the first
  write, so two workers can both read a trial as WAITING and both claim it, and a reader
  that later writes fails with "database is locked" instead of waiting (Optuna #820).
- PostgreSQL (shared): ``pool_pre_ping`` and ``pool_recycle`` so that connections dropped
  during a long trial are replaced (Optuna #5600), small pools because each worker needs
  about two connections (#1347), and TCP keepalives.

Every storage it opens repeats its calls through a brief outage (``optuna_adapter.py``). A
password never leaves this module unmasked: :func:`mask` is applied to every URL that is
printed, logged or put in an error.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import re
import sqlite3
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine

from sweeper import optuna_adapter
from sweeper.errors import SweepError
from sweeper.redact import mask

logger = logging.getLogger(__name__)

ENV_STORAGE = "SWEEPER_STORAGE"
SQLITE_BUSY_TIMEOUT_S = 600.0  # a writer waits this long for the lock before failing
HEARTBEAT_INTERVAL_S = 20  # a running trial's worker writes a heartbeat this often
GRACE_PERIOD_S = 120  # a trial whose heartbeat is older than this is failed and retried
GRPC_CONNECT_TIMEOUT_S = 60.0  # how long opening a grpc:// storage waits for `sweeper proxy`
SCHEMA_RACE_ATTEMPTS = 8  # opening a new database while another process creates its tables


# The pip package of a database driver SQLAlchemy may ask for, where its name differs.
_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient"}


def with_installed_driver(url: str) -> str:
    """``url``, with a PostgreSQL driver that is installed where it names none.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, and no longer knows
    ``postgres://`` (Heroku's spelling) at all; sweeper's PostgreSQL extra installs psycopg2.
    Without this, such a URL failed with advice to install what was already there (issue 17.8).
    """
    scheme, _, rest = url.partition("://")
    if scheme not in ("postgres", "postgresql"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def default_sqlite_url(output_dir: Path) -> str:
    return f"sqlite:///{(Path(output_dir) / 'study.db').resolve()}"


def resolve_url(cli_value: str | None, study_value: str | None, output_dir: Path) -> str:
    """The storage URL by precedence: ``--storage``, ``SWEEPER_STORAGE``, the study, SQLite."""
    url = cli_value or os.environ.get(ENV_STORAGE) or study_value
    if not url:
        return default_sqlite_url(output_dir)
    if "://" not in url:  # a bare path means an SQLite file
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and ":memory:" not in url:
        # Relative SQLite paths are resolved once, here, so every worker opens the same file.
        return f"sqlite:///{Path(url[len('sqlite:///'):]).expanduser().resolve()}"
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres"))


class _ImmediateConnection(sqlite3.Connection):
    """A pysqlite connection whose transactions sweeper begins itself."""


# Engines whose transactions take the write lock at BEGIN. Only after Optuna has set up its
# tables: its schema check nests a second connection inside a first one, which under
# BEGIN IMMEDIATE would wait on itself. At run time Optuna uses one session per thread.
_IMMEDIATE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@event.listens_for(Engine, "begin")
def _begin_transaction(connection: sqlalchemy.Connection) -> None:
    driver = connection.connection.driver_connection
    if isinstance(driver, _ImmediateConnection):
        immediate = connection.engine in _IMMEDIATE_ENGINES
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_creator(path: str) -> Callable[[], sqlite3.Connection]:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(
            path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None,
            check_same_thread=False, factory=_ImmediateConnection,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL keeps this durable across crashes of a process
        return conn

    return connect


def engine_kwargs(url: str, pool: tuple[int, int] | None = None) -> dict[str, Any]:
    if is_sqlite(url):
        path = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ":memory:"
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return {"creator": _sqlite_creator(path)}
    if is_postgres(url):
        return {
            "pool_pre_ping": True,  # replace connections the server or a firewall dropped
            "pool_recycle": 300,
            "pool_size": pool[0] if pool else 2,
            "max_overflow": pool[1] if pool else 4,
            "pool_timeout": 60,
            "connect_args": {
                "connect_timeout": 10,
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
                "application_name": "sweeper",
            },
        }
    return {"pool_pre_ping": True}


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL_S,
    grace_period: int | None = GRACE_PERIOD_S,
    stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    create_tables: bool = True,
    pool: tuple[int, int] | None = None,
    wait_for_server: bool = False,
) -> optuna_adapter.RetryingStorage:
    """An Optuna storage for ``url``, or a :class:`SweepError` that says what is wrong.

    Its calls are repeated while the database or proxy is briefly unreachable
    (:class:`sweeper.optuna_adapter.RetryingStorage`); an RDB storage has Optuna's cache inside.
    Build it inside the process that uses it: pooled connections must not cross ``fork``.
    ``pool`` is (size, overflow) for a PostgreSQL engine, in place of a worker's small one.

    A server that is there but busy (at its connection limit, starting or stopping) is waited
    for. One that cannot be reached at all fails at once, since that is most often a wrong URL,
    unless ``wait_for_server``: a worker the launcher starts passes it, since the launcher has
    opened the same URL already, so that a worker restarted during an outage waits it out
    instead of stopping the sweep.
    """
    if url.startswith("grpc://"):
        return optuna_adapter.wrap(_open_grpc(url))
    url = with_installed_driver(url)
    if not re.match(r"^[a-z][a-z0-9+]*://", url, re.I) and not url.startswith("sqlite"):
        raise SweepError(f"the storage URL {mask(url)!r} is not a URL: use sqlite:///PATH or "
                         "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB")
    attempt, started = 0, time.monotonic()
    while True:
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs(url, pool),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=stale_trial_callback,
                skip_table_creation=not create_tables,
            )
            break
        except Exception as exc:
            # Processes that open a new database at the same moment (a launcher, `sweeper
            # worker` on another host, `status`) race to create Optuna's tables and its
            # alembic stamp; the losers see "already exists". The winner's tables are there
            # a moment later: open again.
            attempt += 1
            if attempt < SCHEMA_RACE_ATTEMPTS and _lost_schema_race(exc):
                time.sleep(0.2 * attempt * (1 + random.random()))  # jitter: losers apart
                continue
            waited = time.monotonic() - started
            if waited < optuna_adapter.RETRY_DEADLINE_S and (
                    optuna_adapter.is_busy(exc) or _was_cut(exc)
                    or (wait_for_server and optuna_adapter.is_transient(exc))):
                logger.warning("the storage %s is not available yet (%s); trying again",
                               mask(url), mask(" ".join(str(exc).split()))[:160])
                time.sleep(min(10.0, 0.5 * 2 ** min(attempt, 5)))
                continue
            raise explain(exc, url) from None
    if is_sqlite(url):
        storage.engine.pool.dispose()  # connections opened before this point begin deferred
        _IMMEDIATE_ENGINES.add(storage.engine)
    return optuna_adapter.wrap(storage)


def _open_grpc(url: str) -> optuna.storages.BaseStorage:
    host, _, port = url[len("grpc://"):].rstrip("/").partition(":")
    try:
        from optuna.storages import GrpcStorageProxy
    except ImportError:
        raise SweepError("a grpc:// storage needs grpcio: pip install 'sweeper[proxy]'") from None
    if port and not port.isdigit():
        raise SweepError(f"the storage URL {url!r} has no port number: use grpc://HOST:13000")
    try:
        with warnings.catch_warnings():  # "experimental": sweeper relies on it knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            proxy = GrpcStorageProxy(host=host or "localhost", port=int(port or 13000))
    except ImportError:
        raise SweepError("a grpc:// storage needs grpcio: pip install 'sweeper[proxy]'") from None
    try:
        # The channel connects lazily: without this, a proxy that is not running shows up
        # later as a storage call failing with UNAVAILABLE.
        proxy.wait_server_ready(timeout=GRPC_CONNECT_TIMEOUT_S)
    except ConnectionError:
        raise SweepError(f"could not reach the storage proxy at {url} within {GRPC_CONNECT_TIMEOUT_S:g}s: "
                         "start it with `sweeper proxy --storage DATABASE_URL` on that host") from None
    return proxy


# A connection the server accepted and then closed (pg_terminate_backend, a restart): the URL is
# right, so opening waits it out as it waits for a busy server. tests/test_faults.py found it:
# with connections cut every 0.2-1 s, a sweep whose trials had all finished exited 2 when the
# end of the sweep opened the storage again.
_CUT = ("server closed the connection", "terminating connection", "connection already closed")


def _was_cut(exc: BaseException | None) -> bool:
    for _ in range(5):  # drivers wrap their errors: look a few causes deep
        if exc is None:
            return False
        if any(s in " ".join(str(exc).split()).lower() for s in _CUT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _lost_schema_race(exc: BaseException | None) -> bool:
    # Optuna wraps some failures of its set-up (the `version_info` row's commit) in its
    # StorageInternalError: the database's own error is the cause.
    while exc is not None:
        text = str(exc).lower()
        if isinstance(exc, sqlalchemy.exc.OperationalError) and "database is locked" in text:
            # SQLite: the set-up reads the schema, then writes; a read transaction that another
            # process wrote behind cannot wait to become a writer, so SQLite refuses it at once
            # instead of waiting out the busy timeout.
            return True
        if isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)) and (
                "already exists" in text or "duplicate key" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def explain(exc: BaseException, url: str) -> SweepError:
    """One line for a failure to open or use the storage at ``url``."""
    shown = mask(url)
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        text += " " + " ".join(str(cause).split())
    lowered = text.lower()
    if isinstance(exc, ImportError) or "no module named" in lowered:
        missing = re.search(r"no module named '([^'.]+)", text, re.I)
        module = missing.group(1) if missing else ""
        if module in ("", "psycopg2"):
            return SweepError(f"the storage URL {shown} needs a database driver that is not installed: "
                              "pip install 'sweeper[postgres]' for PostgreSQL")
        package = _DRIVER_PACKAGES.get(module, module)
        return SweepError(f"the storage URL {shown} needs the database driver {module!r}, which is not installed: "
                          f"pip install '{package}', or use postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB "
                          "(psycopg2, the driver of pip install 'sweeper[postgres]')")
    if isinstance(exc, (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError)) or "could not parse" in lowered:
        return SweepError(f"the storage URL {shown} is not one SQLAlchemy understands: use "
                          "sqlite:///PATH or postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB")
    if "password authentication failed" in lowered or "authentication failed" in lowered:
        return SweepError(f"the database at {shown} refused the user name or password: check the "
                          f"credentials in --storage or {ENV_STORAGE}")
    if "does not exist" in lowered and "database" in lowered:
        return SweepError(f"the database named in {shown} does not exist: create it first "
                          "(createdb NAME) or fix the URL")
    if any(s in lowered for s in ("could not translate host", "name or service not known",
                                  "connection refused", "timeout expired", "could not connect",
                                  "no route to host", "network is unreachable")):
        return SweepError(f"cannot reach the database at {shown}: is the server running and the "
                          "host and port right? (start it, or check --storage / SWEEPER_STORAGE)")
    if isinstance(exc, OSError) and is_sqlite(url):  # making the SQLite file's folder failed
        return SweepError(f"cannot create the folder of the SQLite file of {shown} ({exc.strerror or exc}): "
                          "choose a writable place (--storage, or the study's output_dir)")
    if "unable to open database file" in lowered or "readonly database" in lowered:
        return SweepError(f"cannot open the SQLite file of {shown}: check that its folder exists "
                          "and is writable")
    if "disk" in lowered and "full" in lowered:
        return SweepError(f"the disk holding {shown} is full: free space, then run the same "
                          "command again (nothing finished is lost)")
    return SweepError(f"the storage {shown} failed: {mask(text)[:300]}")
