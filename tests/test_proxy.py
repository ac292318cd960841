"""`sweeper proxy`: many workers, one gRPC storage proxy, a few PostgreSQL connections.

Every test runs the real `sweeper proxy` command on the real PostgreSQL server. The workers
of the 32-worker test are real processes that run sweeper's own claim/run/tell loop
(`sweeper.worker.serve`) with a trivial objective: the full fine-tuning objective would make
each of them import PyTorch, which on this 2-core machine costs more than the sweep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper import budget, record, storage
from sweeper import proxy as proxy_module
from sweeper.errors import SweepError
from sweeper.worker import claim
from tests.helpers import ROOT, TINY_STUDY, ConnectionCounter, run_cli, write_study

# The gRPC proxy is "experimental" in Optuna; sweeper relies on it knowingly.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

GRACE_S = 3  # the proxy's grace period in these tests: a dead worker's trial is retried after it

# One light worker: sweeper's worker loop (claim a ticket, heartbeat, run, tell, retry) with a
# trivial objective that sleeps SECONDS; its storage repeats calls through a proxy restart, as
# every storage that open_storage opens does. argv: STUDY_NAME SECONDS.
LIGHT_WORKER = textwrap.dedent("""
    import os, sys, threading, time, warnings
    import optuna
    from optuna.trial import TrialState
    from sweeper.storage import open_storage
    from sweeper.worker import Outcome, RetryCallback, serve

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    name, seconds = sys.argv[1], float(sys.argv[2])
    study = optuna.load_study(study_name=name, storage=open_storage(os.environ["SWEEPER_STORAGE"]),
                              sampler=optuna.samplers.RandomSampler())

    def run_trial(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        time.sleep(seconds)
        return Outcome(TrialState.COMPLETE, value=x * x)

    assert "torch" not in sys.modules  # a light worker stays light
    sys.exit(serve(study, run_trial, RetryCallback(3), threading.Event(), heartbeat_interval=1,
                   grace_period=600, name=f"light worker {os.getpid()}"))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proxy:
    url: str  # grpc://127.0.0.1:PORT, what workers use
    process: subprocess.Popen[bytes]
    database: str
    log: Path


class Proxies:
    """Starts the real `sweeper proxy` in front of one fresh PostgreSQL database."""

    def __init__(self, pg_url: str, folder: Path) -> None:
        self.pg_url, self.folder = pg_url, folder
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, grace: float = GRACE_S, port: int | None = None) -> Proxy:
        port = port or free_port()
        log = self.folder / f"proxy-{len(self.started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "sweeper", "proxy", "--storage", self.pg_url, "--port", str(port),
                 "--grace", str(grace), "-v"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started.append((process, log))
        client = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port)
        try:
            client.wait_server_ready(timeout=60)
        except ConnectionError:
            process.kill()
            pytest.fail(f"sweeper proxy did not start: {log.read_text()[-2000:]}")
        finally:
            client.close()
        return Proxy(f"grpc://127.0.0.1:{port}", process, self.pg_url.rsplit("/", 1)[1], log)

    def stop_all(self) -> None:
        for process, log in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    code = process.wait(timeout=30)
                finally:
                    process.kill()
                assert code == 0, log.read_text()[-2000:]


@pytest.fixture
def proxies(pg_url: str, tmp_path: Path) -> Iterator[Proxies]:
    started = Proxies(pg_url, tmp_path)
    yield started
    started.stop_all()  # SIGTERM: every proxy must stop cleanly, with exit code 0


@pytest.fixture
def proxy(proxies: Proxies) -> Proxy:
    """The real `sweeper proxy` with a grace period of GRACE_S seconds."""
    return proxies.start()


def make_tickets(url: str, name: str, n_trials: int) -> optuna.Study:
    """The study and its budget, as `sweeper launch` makes them (here through the proxy)."""
    study = optuna.create_study(study_name=name, storage=storage.open_storage(url), direction="minimize")
    budget.ensure_tickets(study, n_trials)
    return study


def start_light_worker(url: str, name: str, seconds: float, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SWEEPER_STORAGE": url, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", LIGHT_WORKER, name, str(seconds)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(300)  # 32 Python processes on 2 cores: 35-60 s here, more on a busy machine
@pytest.mark.postgres
@pytest.mark.long
def test_32_workers_through_the_proxy_finish_the_budget_exactly_on_a_few_connections(
        proxies: Proxies, tmp_path: Path) -> None:
    # A grace period that 32 processes on 2 cores cannot overrun: no live trial is reaped here.
    proxy = proxies.start(grace=120)
    n_workers, n_trials = 32, 96
    study = make_tickets(proxy.url, "many", n_trials)
    started = time.monotonic()
    with ConnectionCounter(proxy.database) as connections:
        workers = [start_light_worker(proxy.url, "many", 0.05, tmp_path / f"worker-{i}.log")
                   for i in range(n_workers)]
        codes = [w.wait(timeout=240) for w in workers]
    elapsed = time.monotonic() - started
    logs = "".join(p.read_text()[-600:] for p in tmp_path.glob("worker-*.log"))
    assert codes == [0] * n_workers, logs

    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == n_trials  # no trial beyond the budget, none twice
    assert all(t.state == TrialState.COMPLETE for t in trials)  # none left WAITING or RUNNING
    # Most workers ran a trial: the proxy served them at once, not one after another.
    assert len({record.PID.get(t) for t in trials}) >= n_workers // 2
    # Direct to PostgreSQL, each worker holds about 2 connections (64 here); the proxy holds
    # its fixed pool whatever the number of workers.
    assert 1 <= connections.peak <= proxy_module.PROXY_POOL_SIZE == 6, connections.samples
    print(f"\n32 workers, {n_trials} trials in {elapsed:.1f}s through the proxy; PostgreSQL "
          f"connections: peak {connections.peak}")


@pytest.mark.postgres
def test_a_killed_worker_behind_the_proxy_has_its_trial_failed_and_retried_by_the_proxy(
        proxy: Proxy, tmp_path: Path) -> None:
    study = make_tickets(proxy.url, "kill", 2)
    slow = start_light_worker(proxy.url, "kill", 600, tmp_path / "slow.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until its trial is running and beating
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running and record.HEARTBEAT_AT.get(running[0]) is not None:
            break
        time.sleep(0.2)
    else:
        pytest.fail((tmp_path / "slow.log").read_text()[-2000:])
    victim = running[0]
    assert record.PID.get(victim) == slow.pid
    slow.send_signal(signal.SIGKILL)
    slow.wait()

    # No worker is left: only the proxy's reaper can fail the trial and queue its retry.
    deadline = time.monotonic() + GRACE_S + 30
    while time.monotonic() < deadline:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if failed and len(waiting) == 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the proxy did not fail trial {victim.number}: {study.get_trials(deepcopy=False)}")
    assert failed[0].number == victim.number
    assert "no heartbeat" in failed[0].user_attrs["fail_reason"]
    retry = next(t for t in waiting if t.system_attrs.get("retry_history"))
    assert retry.system_attrs["retry_history"] == [victim.number]
    # The same trial, again. Compared with the failed trial as stored now: the snapshot taken
    # while it ran may predate its first suggest.
    assert retry.params == failed[0].params

    fast = start_light_worker(proxy.url, "kill", 0, tmp_path / "fast.log")
    assert fast.wait(timeout=120) == 0, (tmp_path / "fast.log").read_text()[-2000:]
    tally = budget.tally(study.get_trials(deepcopy=False))
    assert (tally.complete, tally.retried, tally.waiting, tally.running, tally.failed) == (2, 1, 0, 0, 0)


@pytest.mark.postgres
@pytest.mark.long
def test_workers_ride_out_a_restart_of_the_proxy(proxies: Proxies, tmp_path: Path) -> None:
    first = proxies.start(grace=120)
    study = make_tickets(first.url, "restart", 6)
    worker = start_light_worker(first.url, "restart", 1.0, tmp_path / "worker.log")
    try:
        # Stop the proxy while the worker is inside a trial, after its first one finished.
        while not (study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   and any(record.HEARTBEAT_AT.get(t) is not None
                           for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))):
            time.sleep(0.1)
        first.process.send_signal(signal.SIGTERM)  # calls in flight finish; new ones are refused
        assert first.process.wait(timeout=30) == 0
        time.sleep(3)  # the worker's storage calls fail with UNAVAILABLE and back off
        proxies.start(grace=120, port=int(first.url.rsplit(":", 1)[1]))
        assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-2000:]
    finally:
        worker.kill()
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * 6
    assert "storage unavailable" in (tmp_path / "worker.log").read_text()


@pytest.mark.postgres
def test_a_restarted_proxy_knows_the_trials_workers_were_running(proxies: Proxies) -> None:
    first = proxies.start(grace=120)
    make_tickets(first.url, "restarted", 1)
    # A sampler that reads no trials, so that nothing but the parameter reaches the new proxy.
    study = optuna.load_study(study_name="restarted", storage=storage.open_storage(first.url),
                              sampler=optuna.samplers.RandomSampler())
    trial = claim(study)  # running, before the restart, without parameters yet
    assert trial is not None
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=30) == 0
    proxies.start(grace=120, port=int(first.url.rsplit(":", 1)[1]))
    # The first call after the restart is about that trial (Optuna's cached storage behind the
    # proxy answered NOT_FOUND to it until the proxy read every study on start).
    x = trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, x)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE]


@pytest.mark.slow
@pytest.mark.timeout(300)  # the real sweep: PyTorch in three processes
@pytest.mark.postgres
def test_launch_through_the_proxy_runs_the_real_sweep(proxies: Proxies, tmp_path: Path) -> None:
    proxy = proxies.start(grace=120)  # above the workers' heartbeat interval (20 s by default)
    study_file = write_study(tmp_path, TINY_STUDY)
    result = run_cli("launch", str(study_file), "--workers", "1", "--n-trials", "2",
                     env={"SWEEPER_STORAGE": proxy.url})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best trial" in result.stderr
    study = optuna.load_study(study_name="tiny", storage=storage.open_storage(proxy.url))
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * 2
    # The workers kept the attribute heartbeat, since the proxy has no native one.
    assert all(record.HEARTBEAT_AT.get(t) is not None for t in study.get_trials(deepcopy=False))
    status = run_cli("status", str(study_file), "--json", env={"SWEEPER_STORAGE": proxy.url})
    assert status.returncode == 0 and '"complete": 2' in status.stdout, status.stderr


def test_a_proxy_that_is_not_running_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "GRPC_CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(SweepError, match="start it with `sweeper proxy"):
        storage.open_storage(f"grpc://127.0.0.1:{free_port()}")


@pytest.mark.postgres
def test_proxy_refuses_a_busy_port_and_hides_the_password(pg_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        url = pg_url.replace("postgres@", "postgres:hunter2@")
        result = run_cli("proxy", "--storage", url, "--port", str(port), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_proxy_needs_a_database_url() -> None:
    result = run_cli("proxy")
    assert result.returncode == 2
    assert "needs the database URL" in result.stderr and "Traceback" not in result.stderr
