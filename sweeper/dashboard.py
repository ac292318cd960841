"""``sweeper dashboard``: optuna-dashboard on a sweep's storage and artifact store.

A sweep is an ordinary Optuna study, so optuna-dashboard reads it as it is. What sweeper adds
is what the dashboard cannot know by itself: the storage URL, resolved as every other command
resolves it (``--storage``, ``SWEEPER_STORAGE``, the study's, the embedded SQLite file) and
opened with the same engine settings (``storage.open_storage``), and the study's artifact
store, which Optuna does not record anywhere: with it each trial's checkpoint files are listed
beside the trial and download from the folder or S3 bucket that holds them.

The server is optuna-dashboard's WSGI application (``optuna_dashboard.wsgi``) on a threaded
``wsgiref`` server that sweeper binds itself, rather than ``run_server``: threaded, because the
page loads its assets and polls the API at once; bound here, so that a busy port is one clear
error and the address is known (``--port 0`` picks a free one) before anything is served.
optuna-dashboard has no authentication, so it listens on 127.0.0.1 unless ``--host`` says
otherwise.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import optuna

from sweeper import checkpoints
from sweeper.errors import SweepError
from sweeper.storage import mask, open_storage
from sweeper.study import Sweep

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # the dashboard has no login: reachable from this machine only
DEFAULT_PORT = 8080
INSTALL_HINT = "pip install 'sweeper[dashboard]'"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection must not keep Ctrl-C waiting


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Requests go to the log (``-vv``), not to the terminal: the page polls every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@dataclass
class Dashboard:
    """A bound, not yet serving, dashboard; ``serve_forever`` serves until Ctrl-C."""

    server: WSGIServer
    study_name: str
    study_id: int
    host: str
    port: int
    artifacts: str  # where checkpoints download from, for the user to read

    @property
    def url(self) -> str:
        """Where a browser on this machine (or, for a public ``--host``, another) finds the study."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/dashboard/studies/{self.study_id}"

    def serve_forever(self) -> None:
        """Serve until Ctrl-C, or SIGTERM (``docker stop``, Kubernetes): both end in
        ``KeyboardInterrupt``, so the caller stops the same way for either."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.server.serve_forever(poll_interval=0.5)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.close()

    def close(self) -> None:
        self.server.server_close()


def start(sweep: Sweep, url: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> Dashboard:
    """Open the storage and artifact store of ``sweep`` and bind the dashboard to ``host:port``."""
    try:
        import optuna_dashboard  # optional: pip install 'sweeper[dashboard]'
    except ImportError:
        raise SweepError("`sweeper dashboard` needs optuna-dashboard, which is not installed: "
                         f"{INSTALL_HINT}") from None
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise SweepError(f"the study {sweep.name!r} has not started: there is no {url[len('sqlite:///'):]} "
                         "yet (run `sweeper launch STUDY` first)")
    storage = open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
    try:
        study_id = storage.get_study_id_from_name(sweep.name)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        held = ", ".join(map(repr, names)) or "no study"
        raise SweepError(f"the study {sweep.name!r} does not exist in {mask(url)} (it holds {held}): "
                         "run `sweeper launch STUDY` first") from None
    # The store the study file names, else the one the launcher recorded on the study (so a
    # dashboard on another machine finds an S3 store), else the default folder.
    study = optuna.load_study(study_name=sweep.name, storage=storage)
    location = checkpoints.location_of(sweep, study)
    shown = location or str(sweep.output_path / "artifacts")
    try:
        store = checkpoints.open_store(location, sweep.output_path, create=False)
    except SweepError as exc:  # the trials are still worth seeing; their files will not download
        logger.warning("serving %s without its checkpoints: %s", sweep.name, exc)
        store, shown = None, "none (see the warning above)"
    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), _QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SweepError(f"port {port} on {host} is in use (another dashboard?): choose another "
                             "with --port, or --port 0 for any free one") from None
        if exc.errno == errno.EACCES:
            raise SweepError(f"port {port} on {host} needs privileges: use a port above 1023") from None
        raise SweepError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: check --host") from None
    server.set_app(app)
    bound_port = int(server.server_address[1])
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the dashboard listens on %s and has no authentication: anyone who can reach "
                       "port %d can read and change the study", host, bound_port)
    logger.info("dashboard for %s (storage %s, artifacts %s) on %s:%d", sweep.name, mask(url), shown,
                host, bound_port)
    return Dashboard(server, sweep.name, study_id, host, bound_port, shown)
