"""Faults injected for real while small sweeps run (issue 17): each ends with the exact budget,
no trial lost to the fault (none failed for good), and no orphaned file in the artifact store.

- the storage connection cut again and again (``pg_terminate_backend`` in a loop from here);
- the database's connection limit reached (a role with ``CONNECTION LIMIT``, its connections
  all taken from here for a while, then given back);
- the PostgreSQL server restarted (a private server of this test's, never the shared one);
- a worker killed (``kill -9``) at the moment its first checkpoint file appears in the store;
- creators started at once: real ``sweeper create`` processes, and forked ones many times;
- every trial failing: the launcher says why in one line and exits 1.

The sweeps are the tiny study of tests/helpers.py: 3 trials, one epoch of 400 sentences.
Each fault runs once in the default run on that smallest sweep; what repeats it or makes it
heavier (cuts under two workers of longer trials, forked creators round after round) and the
every-trial-failing launch carry the `long` mark, for CI's run after the default one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, checkpoints, record, storage
from sweeper.errors import SweepError
from tests.conftest import PG_ADMIN_URL, PrivatePostgres
from tests.helpers import ROOT, TINY_STUDY, write_study

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TRIALS = 3
SWEEP_SETS = [f"n_trials={TRIALS}", "pruner=none", "keep=2"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# --------------------------------------------------------------------------- a sweep, watched


class Sweep:
    """``sweeper launch`` of the tiny study in a subprocess, and reads of its trials."""

    def __init__(self, folder: Path, url: str, *flags: str, sets: list[str] = SWEEP_SETS,
                 watch_url: str | None = None) -> None:
        self.folder, self.url, self.watch_url = folder, url, watch_url or url
        study = write_study(folder, TINY_STUDY)
        self.artifacts = folder / "out" / "artifacts"
        self.artifacts.mkdir(parents=True)  # there before the workers: a test may watch it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sweeper", "launch", str(study), "--heartbeat", "1", "--grace", "6",
             *flags, *_sets(sets)],
            cwd=ROOT, env={**os.environ, "SWEEPER_STORAGE": url}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._storage: optuna.storages.BaseStorage | None = None

    def study(self) -> optuna.Study | None:
        """The sweep's study, through one storage opened once (every engine holds connections)."""
        if self._storage is None:
            try:
                self._storage = storage.open_storage(self.watch_url, heartbeat_interval=None, grace_period=None,
                                                     create_tables=False)
            except SweepError:  # no tables yet
                return None
        try:
            return optuna.load_study(study_name="tiny", storage=self._storage)
        except KeyError:  # not created yet
            return None

    def wait_for(self, found: Callable[[FrozenTrial], bool], timeout: float = 180) -> FrozenTrial:
        deadline = time.time() + timeout
        while time.time() < deadline:
            study = self.study()
            for trial in study.get_trials(deepcopy=False) if study else []:
                if found(trial):
                    return trial
            if self.process.poll() is not None:
                pytest.fail(f"the launcher exited with {self.process.returncode} first: "
                            f"{self.process.communicate()[1][-3000:]}")
            time.sleep(0.1)
        self.process.kill()
        pytest.fail(f"timed out; launcher: {self.process.communicate()[1][-3000:]}")

    def finish(self, timeout: float = 300) -> str:
        """Wait for the launcher; its stderr. The launch must have succeeded."""
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, err[-3000:]
        return err

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        if self._storage is not None:
            self._storage.dispose()  # type: ignore[attr-defined]


def running(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.RUNNING and record.PID.get(trial) is not None


def outcome(study: optuna.Study) -> dict[str, int]:
    """Trials budgeted / finished / lost (failed for good) / duplicated (run again as a retry)."""
    trials = study.get_trials(deepcopy=False)
    tally = budget.tally(trials)
    return {"budgeted": int(record.N_TRIALS.get(study) or 0), "finished": tally.finished,
            "lost": tally.failed, "duplicated": tally.retried}


def orphans(study: optuna.Study, artifacts: Path) -> set[str]:
    """Files in the store that no kept checkpoint lists (a resume state left behind is one)."""
    gone = checkpoints.deleted(study)
    kept = {meta["id"] for t in study.get_trials(deepcopy=False) if t.number not in gone
            for meta in (record.CHECKPOINT.get(t) or {}).get("files", {}).values()}
    on_disk = {p.name for p in artifacts.iterdir()}
    assert kept <= on_disk, f"kept checkpoints with files missing: {kept - on_disk}"
    return on_disk - kept


def note_figures(fault: str, figures: dict[str, object]) -> None:
    """With SWEEPER_FAULT_FIGURES=FILE, append this fault's figures to FILE (one JSON line
    each), before anything is asserted: the closing table of issue 17 is made from them."""
    path = os.environ.get("SWEEPER_FAULT_FIGURES")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"fault": fault, **figures}) + "\n")


def assert_clean_end(sweep: Sweep, fault: str, *, duplicated: int | None = None) -> dict[str, int]:
    """The exact budget, none lost, no orphaned file, at most `keep` checkpoints."""
    study = sweep.study()
    assert study is not None
    seen = outcome(study)
    note_figures(fault, {**seen, "orphaned_files": len(orphans(study, sweep.artifacts))})
    assert (seen["budgeted"], seen["finished"], seen["lost"]) == (TRIALS, TRIALS, 0), seen
    if duplicated is not None:
        assert seen["duplicated"] == duplicated, seen
    assert orphans(study, sweep.artifacts) == set()
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    assert len(numbers) == len(set(numbers)) == TRIALS + seen["duplicated"]
    return seen


@pytest.fixture
def sweeps() -> Iterator[list[Sweep]]:
    made: list[Sweep] = []
    yield made
    for sweep in made:
        sweep.close()


def _admin() -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(PG_ADMIN_URL, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")


# --------------------------------------------------------------------------- connections cut


class ConnectionCutter(threading.Thread):
    """Terminates every connection to ``database`` every 0.2-1 s, from the admin database."""

    def __init__(self, database: str) -> None:
        super().__init__(daemon=True)
        self.database, self.done, self.cut = database, threading.Event(), 0
        self.rounds = 0

    def run(self) -> None:
        pause = random.Random(17)
        engine = _admin()
        query = sqlalchemy.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = :d AND pid <> pg_backend_pid()")
        with engine.connect() as conn:
            while not self.done.wait(pause.uniform(0.2, 1.0)):
                self.cut += int(conn.execute(query, {"d": self.database}).scalar() or 0)
                self.rounds += 1
        engine.dispose()


@pytest.mark.parametrize("workers, n_train", [
    pytest.param(1, 400, id="one-worker"),
    # Trials of 1,600 sentences (a few seconds each here), so that the cuts meet every part of them.
    pytest.param(2, 1600, id="two-workers-longer-trials", marks=pytest.mark.long),
])
@pytest.mark.long
def test_a_sweep_whose_connections_are_cut_again_and_again_ends_exactly(
        tmp_path: Path, pg_url: str, sweeps: list[Sweep], workers: int, n_train: int) -> None:
    sweep = Sweep(tmp_path, pg_url, "--workers", str(workers), sets=[*SWEEP_SETS, f"data.n_train={n_train}"])
    sweeps.append(sweep)
    sweep.wait_for(running)  # the study and its tickets exist: cut from now to the end
    cutter = ConnectionCutter(pg_url.rsplit("/", 1)[1])
    cutter.start()
    try:
        sweep.finish()
    finally:
        cutter.done.set()
        cutter.join(timeout=10)
    assert cutter.cut >= 3, f"only {cutter.cut} connections were cut in {cutter.rounds} rounds"
    assert_clean_end(sweep, "connections cut every 0.2-1 s")


# --------------------------------------------------------------------------- the connection limit


@contextlib.contextmanager
def limited_role(pg_url: str, limit: int) -> Iterator[str]:
    """A login role that may hold ``limit`` connections, owning nothing outside the test's
    database (the server's limit on superusers cannot be set per test); yields its URL."""
    role = f"sweeper_limit_{uuid.uuid4().hex[:8]}"
    database = pg_url.rsplit("/", 1)[1]
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT {limit}'))
        conn.execute(sqlalchemy.text(f'GRANT ALL ON DATABASE "{database}" TO "{role}"'))
    inside = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
    with inside.connect() as conn:
        conn.execute(sqlalchemy.text(f'GRANT ALL ON SCHEMA public TO "{role}"'))
    url = pg_url.replace("postgres@", f"{role}@", 1)
    # Optuna's tables made by the role, so that it owns them (not the superuser who watches).
    storage.open_storage(url, heartbeat_interval=None, grace_period=None).dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                         {"r": role})
        with inside.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP OWNED BY "{role}"'))
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP ROLE "{role}"'))
        inside.dispose()
        admin.dispose()


def take_every_connection(url: str) -> list[sqlalchemy.Connection]:
    """Connections of ``url``'s role until the server refuses one ("too many connections")."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    held = []
    while True:
        try:
            held.append(engine.connect())
        except sqlalchemy.exc.OperationalError as exc:
            assert "too many connections" in str(exc), exc
            return held


@pytest.mark.long
def test_a_sweep_at_its_connection_limit_waits_and_ends_exactly(
        tmp_path: Path, pg_url: str, sweeps: list[Sweep]) -> None:
    with limited_role(pg_url, 24) as url:
        # Watched as the server's superuser, whom the role's limit does not count.
        sweep = Sweep(tmp_path, url, "--workers", "2", watch_url=pg_url)
        sweeps.append(sweep)
        sweep.wait_for(running)
        held = take_every_connection(url)
        time.sleep(4.0)  # past a trial's end: its tell and the next claim meet the limit
        for connection in held:
            connection.close()
        sweep.finish()
        assert held, "the sweep held every connection already: the limit was not reached from here"
        assert_clean_end(sweep, "connection limit reached for 4 s")


# --------------------------------------------------------------------------- the server restarted


@pytest.mark.long
def test_a_sweep_across_a_server_restart_ends_exactly(tmp_path: Path, private_pg: PrivatePostgres,
                                                      sweeps: list[Sweep]) -> None:
    """On a private server: the shared one serves every other test's database."""
    database = f"faults_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(private_pg.url(), isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    sweep = Sweep(tmp_path, private_pg.url(database=database), "--workers", "2")
    sweeps.append(sweep)
    sweep.wait_for(running)
    private_pg.restart()
    err = sweep.finish()
    assert private_pg.PASSWORD not in err
    assert_clean_end(sweep, "server restarted")


# --------------------------------------------------------------------------- killed while saving


class FileWatch:
    """Names of files created in a folder, as the kernel reports them (inotify): no polling
    interval in which a save could begin and end unseen."""

    IN_CREATE = 0x100
    EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def created(self, timeout: float) -> list[str]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data, names, offset = os.read(self.fd, 65536), [], 0
        while offset < len(data):
            _, _, _, length = self.EVENT.unpack_from(data, offset)
            start = offset + self.EVENT.size
            names.append(data[start:start + length].rstrip(b"\0").decode())
            offset = start + length
        return names

    def close(self) -> None:
        os.close(self.fd)


def worker_pid(log: Path) -> int | None:
    """The process whose output goes to ``log``: a worker, forked or fresh, and nothing else."""
    target = os.path.realpath(log)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "fd" / "1") == target:
                    return int(entry.name)
    return None


@pytest.mark.long
def test_a_worker_killed_while_it_saves_leaves_no_orphaned_checkpoint(tmp_path: Path, sweeps: list[Sweep]) -> None:
    """On SQLite only: which files a trial left is read from its record, the same on any storage."""
    sweep = Sweep(tmp_path, f"sqlite:///{tmp_path / 'study.db'}", "--workers", "1")
    sweeps.append(sweep)
    watch = FileWatch(sweep.artifacts)
    pid, killed_at = None, None
    try:
        deadline = time.time() + 240
        while killed_at is None and time.time() < deadline and sweep.process.poll() is None:
            for name in watch.created(0.5):
                # A resume state (resume-*) comes at each evaluation: the worker is found then. A
                # model file, with an id of Optuna's (a UUID), begins the save: kill it now.
                pid = pid or worker_pid(tmp_path / "out" / "logs" / "worker-0.log")
                if pid is not None and not name.startswith("resume-"):
                    os.kill(pid, signal.SIGKILL)
                    killed_at = name
                    break
    finally:
        watch.close()
    assert killed_at is not None, f"no save was caught: {sweep.process.communicate()[1][-3000:]}"
    sweep.finish()
    study = sweep.study()
    assert study is not None
    trials = study.get_trials(deepcopy=False)
    [victim] = [t for t in trials if t.number in budget.superseded(trials)]
    assert any(meta.artifact_id == killed_at for meta in optuna.artifacts.get_all_artifact_meta(
        victim, storage=study._storage)), "the file that appeared was the killed trial's"
    assert_clean_end(sweep, "worker killed while saving", duplicated=1)


# --------------------------------------------------------------------------- creators at once


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_creators_started_at_once_leave_exactly_the_budget(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    study_file = write_study(tmp_path, TINY_STUDY)
    start = time.time() + 6.0  # past the imports of both: they count and add at the same moment
    script = ("import sys, time; from sweeper import cli; "
              "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); sys.exit(cli.main(sys.argv[2:]))")
    creators = [subprocess.Popen([sys.executable, "-c", script, str(start), "create", str(study_file),
                                  "--storage", url, "--n-trials", "40"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    for creator in creators:
        out, err = creator.communicate(timeout=120)
        assert creator.returncode == 0, err[-2000:]
        assert "with a budget of 40 trials" in out
    study = optuna.load_study(study_name="tiny", storage=url)
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    note_figures(f"2 `sweeper create` at once ({backend})", {"budgeted": 40, "tickets": len(numbers)})
    assert numbers == list(range(40))


def _add_tickets_at(url: str, name: str, start: float, n_trials: int) -> None:
    opened = storage.open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
    study = optuna.load_study(study_name=name, storage=opened)
    time.sleep(max(0.0, start - time.time()))
    budget.ensure_tickets(study, n_trials)
    opened.dispose()


@pytest.mark.long  # repeated: the real `sweeper create` test above is the default run's
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_forked_creators_leave_exactly_the_budget_round_after_round(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Three processes at once, three rounds: the window between counting and adding is where
    two creators used to both add the whole budget (50, 76, 79 tickets of 40 on PostgreSQL)."""
    url = f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    opened = storage.open_storage(url, heartbeat_interval=None, grace_period=None)
    fork = multiprocessing.get_context("fork")
    counts = []
    for round_ in range(3):
        name = f"round-{round_}"
        optuna.create_study(study_name=name, storage=opened)
        start = time.time() + 1.0
        creators = [fork.Process(target=_add_tickets_at, args=(url, name, start, 20)) for _ in range(3)]
        for creator in creators:
            creator.start()
        for creator in creators:
            creator.join(timeout=120)
            assert creator.exitcode == 0
        counts.append(len(optuna.load_study(study_name=name, storage=opened).get_trials(deepcopy=False)))
    opened.dispose()
    note_figures(f"3 forked creators, 3 rounds ({backend})", {"budgeted": 20, "tickets_per_round": counts})
    assert counts == [20] * 3


# --------------------------------------------------------------------------- every trial failing


@pytest.mark.long
def test_a_launch_whose_every_trial_fails_exits_1_naming_the_failures(tmp_path: Path, sweeps: list[Sweep]) -> None:
    # Drawn batch sizes are checked when a trial starts, so each trial fails at once.
    sweep = Sweep(tmp_path, f"sqlite:///{tmp_path / 'study.db'}", "--workers", "1",
                  sets=["n_trials=2", "sampler=random", "space.batch_size=[0, -2]"])
    sweeps.append(sweep)
    out, err = sweep.process.communicate(timeout=300)
    assert sweep.process.returncode == 1, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("no trial completed")]
    assert "2 failed" in line and "batch_size" in line and "exit code 1" in line
    assert "no best trial" not in err, "one line, not two, says that nothing completed"
