"""``sweeper proxy``: one gRPC storage proxy between the database and hundreds of workers.

Why: a worker that talks to PostgreSQL itself holds a small pool of connections (about two,
Optuna #1347), and ``sweeper worker`` adds its launcher's; three hundred workers would need
several hundred connections, far beyond PostgreSQL's default ``max_connections`` of 100.
Optuna's gRPC storage proxy (``run_grpc_proxy_server``, experimental since Optuna 4.2) holds
one pool for all of them: workers use ``grpc://HOST:13000`` as their storage URL, and the
database sees the proxy's few connections, whatever the number of workers.

What it costs, and how sweeper pays it:

- *Liveness.* Optuna's heartbeat lives in the RDB storage and the gRPC client does not
  implement it, so workers behind the proxy keep the *attribute heartbeat* of
  :mod:`sweeper.liveness` (the ``heartbeat_at`` user attribute, written every heartbeat
  interval). Each worker reaps stale trials before it claims a ticket; the proxy reaps too,
  every few seconds, for every study that ``sweeper launch`` or ``sweeper create`` set up, so a
  dead worker's trial is failed and retried after ``grace`` seconds even while every other
  worker is busy in a long trial.
- *One study, one way in.* The attribute heartbeat cannot see Optuna's native one: a study's
  workers must all go through the proxy, or none of them (a worker talking to PostgreSQL
  directly writes only native heartbeats, which a proxied reaper takes for silence).
- *A single point of failure.* While the proxy is down, every storage call of every worker
  fails with gRPC ``UNAVAILABLE``; workers retry such calls with backoff (see
  ``optuna_adapter.RetryingStorage``) for five minutes, so a restarted proxy loses nothing. The proxy keeps
  no state of its own: restart it anywhere with the same database URL.
- *No authentication.* The channel is plain gRPC: anyone who reaches the port can read and
  change every study. It listens on 127.0.0.1 unless told otherwise; keep it on a private
  network.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna

from sweeper import liveness, optuna_adapter, record
from sweeper.errors import SweepError
from sweeper.storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, mask, open_storage
from sweeper.worker import RetryCallback

logger = logging.getLogger(__name__)
# The gRPC proxy is "experimental" in Optuna 5 (since 4.2); sweeper relies on it knowingly,
# with Optuna pinned to one minor version (pyproject.toml).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DEFAULT_PORT = 13000  # Optuna's default for the proxy
DEFAULT_THREADS = 8  # gRPC handler threads; each busy one holds one database connection
DEFAULT_MAX_RETRIES = 3  # for a study recorded without its configuration (Sweep.max_retries)
STOP_GRACE_S = 10.0  # on SIGTERM, how long the calls in flight get to finish
# A fixed pool, kept open: overflow connections would be opened and closed again under load,
# and closing ones linger on the server while new ones start. Handler threads beyond it wait.
PROXY_POOL_SIZE = 6


def sweeper_studies(storage: optuna.storages.BaseStorage) -> list[str]:
    """Names of the studies in ``storage`` that sweeper set up (they carry a trial budget)."""
    return [s.study_name for s in storage.get_all_studies() if record.N_TRIALS.key in s.system_attrs]


class Reaper:
    """Fails and retries, every ``interval`` seconds, the trials whose heartbeat is older than
    ``grace`` seconds, in every sweeper study of ``storage``."""

    def __init__(self, storage: optuna.storages.BaseStorage, grace: float, interval: float | None = None) -> None:
        self.storage = storage
        self.grace = grace
        self.interval = interval if interval is not None else max(1.0, grace / 4)
        self.done = threading.Event()
        self._studies: dict[str, optuna.Study] = {}
        self._thread = threading.Thread(target=self._loop, name="sweeper-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.done.set()
        self._thread.join(timeout=30)

    def reap_once(self) -> dict[str, list[int]]:
        """One pass over every sweeper study: study name -> numbers of the trials failed."""
        reaped: dict[str, list[int]] = {}
        for name in sweeper_studies(self.storage):
            study = self._studies.get(name)
            if study is None:
                study = self._studies[name] = optuna.load_study(study_name=name, storage=self.storage)
            config = record.STUDY_CONFIG.get(study) or {}
            retry = RetryCallback(int(config.get("max_retries", DEFAULT_MAX_RETRIES)))
            numbers = liveness.reap(study, self.grace, retry)
            if numbers:
                logger.warning("study %r: failed stale trials %s (no heartbeat for %gs) and queued "
                               "their retries", name, numbers, self.grace)
                reaped[name] = numbers
        return reaped

    def _loop(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.reap_once()
            except Exception as exc:  # noqa: BLE001  (the database is briefly down: the next pass tries again)
                logger.warning("cannot check for stale trials: %s", mask(" ".join(str(exc).split()))[:200])


def serve(url: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, grace: float = GRACE_PERIOD_S,
          threads: int = DEFAULT_THREADS) -> None:
    """Serve the RDB storage at ``url`` over gRPC on ``host:port`` until SIGTERM or Ctrl-C."""
    if url.startswith("grpc://"):
        raise SweepError(f"the proxy's --storage is {url}, another proxy: give it the database URL "
                         "(postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB)")
    if threads < 1:
        raise SweepError(f"--threads is {threads}: use 1 or more")
    if grace <= 0:
        raise SweepError(f"--grace is {grace:g}: use a number of seconds above the workers' heartbeat "
                         "interval (default 120)")
    if grace <= HEARTBEAT_INTERVAL_S:
        logger.warning("--grace %gs is not above the workers' default heartbeat interval (%ds): give "
                       "their --heartbeat a shorter interval, or live trials will be failed", grace,
                       HEARTBEAT_INTERVAL_S)
    try:
        import grpc  # noqa: F401  (Optuna imports it lazily; fail here, with the hint)
    except ImportError:
        raise SweepError("`sweeper proxy` needs grpcio: pip install 'sweeper[proxy]'") from None
    # No native heartbeat here: its workers cannot write one (see the module docstring).
    storage = open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=True,
                           pool=(PROXY_POOL_SIZE, 0))
    if storage.rdb is None:
        raise SweepError(f"the proxy's --storage {mask(url)} is not a database: use "
                         "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB")
    # Optuna's cache is inside (as Optuna advises for the proxy: every worker's poll for tickets
    # would otherwise re-read every trial of the study from the database), and the database's
    # blips are retried here, once for all the proxy's workers.
    # That cache finds a trial's study through the trials it has read, and answers NOT_FOUND
    # to a parameter set on a trial it has not. After a restart of the proxy, a worker's first
    # call may be exactly that, for the trial it is running: read every study once first.
    for frozen in storage.get_all_studies():
        storage.get_all_trials(optuna_adapter.frozen_study_id(frozen), deepcopy=False)
    # With the server in hand (not run_grpc_proxy_server), SIGTERM lets the calls in flight finish.
    try:
        server = optuna_adapter.make_grpc_server(storage, host, port, ThreadPoolExecutor(max_workers=threads))
    except RuntimeError as exc:
        storage.dispose()
        if "bind" in str(exc).lower():
            raise SweepError(f"cannot listen on {host}:{port} (in use, or not an address of this "
                             "machine): choose another --port or --host") from None
        raise
    reaper = Reaper(storage, grace)
    previous = _stop_on_sigterm()
    server.start()
    reaper.start()
    logger.info("storage proxy listening on %s:%d", host, port)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        logger.info("storage proxy stopping: finishing the calls in flight")
        server.stop(grace=STOP_GRACE_S).wait()
        raise
    finally:
        reaper.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        storage.dispose()


def _stop_on_sigterm() -> Any:
    """Make SIGTERM (``docker stop``, Kubernetes) end the proxy like Ctrl-C: as PID 1 in a
    container a process ignores a signal it has no handler for."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)
