"""One sweep on several namespaced hosts, and the faults only many machines show.

``run_scenario`` makes the hosts (``net.Network``), relays the bridge's address to PostgreSQL
(``relay.Relay``), creates one study with the real `sweeper create` on the first host, starts
the real `sweeper worker` on every host, and then, while the sweep runs, in phases:

1. *clean*: a few trials with nothing added on the links (the baseline duration);
2. *latency*: ``delay_ms`` more on every round trip to the database (the relay's delay line)
   and ``loss_percent`` of the packets lost each way on every link (iptables), until as many
   trials have run wholly under it; then the links are clean again;
3. *host lost*: the last host, frozen mid-trial (SIGSTOP, so that the trial cannot end in
   between) and then killed with every process it has (SIGKILL), launcher included;
4. *partition*: the host before it cut off mid-trial for longer than the grace period, until
   its trial has been failed and its retry taken by another host, then connected again.

"Mid-trial" is between the trial's first and second evaluations, once it has saved a resume
state: its retry must continue from there, and the late worker's next call is a report. (A
cut in the first moments of a trial, before ``Objective.run`` is inside its ``try``, or
while it saves its checkpoint, kills the late worker instead of refusing it: bugs of their
own, in bench/README.md's "Many hosts".)

It waits for every remaining host's `sweeper worker` to finish and returns what it saw
(``Outcome``); the tests and ``bench/multihost.py`` judge and print it. Every wait has a
deadline and fails with what each host logged.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, record
from tests.multihost.net import Host, Network
from tests.multihost.relay import Relay

ROOT = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get("SWEEPER_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
HEARTBEAT_S = 1  # the workers' --heartbeat: short, so that the faults are seen in seconds
GRACE_S = 6  # their --grace: a trial silent this long is failed and retried by another host (3 s reaped
# live trials on a busy 2-core machine with 100 ms links: a beat can take seconds there)

# The same work in every trial (unfreeze depth and batch size fixed, no pruner), so that the
# trials' durations differ by what the links add, not by what the sampler picked.
STUDY = """
    from sweeper import LogFloat, Sweep, SyntheticText, TinyTextClassifier

    sweep = Sweep(
        name="multihost",
        model=TinyTextClassifier(layers=2, hidden=32, heads=2),
        data=SyntheticText(n_train=400, n_test=100),
        space={
            "learning_rate": LogFloat(1e-4, 1e-2),
            "pretrain_loss_weight": LogFloat(1e-3, 1.0),
            "unfreeze_depth": 2,
            "batch_size": 32,
        },
        pretrain_loss="l2sp",
        epochs=1,
        evals_per_epoch=EVALS,
        pruner="none",
        n_trials=N_TRIALS,
        output_dir="OUTPUT_DIR",
    )
"""


@dataclass
class Settings:
    hosts: int = 4
    n_trials: int = 24
    per_phase: int = 4  # trials that run wholly in the clean phase, and in the latency phase
    evals: int = 4  # evaluations (reports, resume states) per trial
    delay_ms: float = 100.0
    loss_percent: float = 1.0
    faults: bool = True  # phases 3 and 4
    deadline_s: float = 420.0  # for the whole scenario


@dataclass
class Outcome:
    settings: Settings
    trials: list[FrozenTrial]
    exit_codes: dict[str, int | None]  # host name -> its `sweeper worker`'s exit code (None: killed)
    clean_s: list[float] = field(default_factory=list)  # durations of the clean phase's trials
    latency_s: list[float] = field(default_factory=list)  # ... and of the latency phase's
    lost_trial: int | None = None  # the trial running on the lost host when it was killed
    lost_host: str | None = None
    killed_processes: int = 0
    partitioned_trial: int | None = None
    partitioned_host: str | None = None
    partition_s: float = 0.0  # how long the link was down
    refused: list[str] = field(default_factory=list)  # the late workers' log lines
    crashes: list[str] = field(default_factory=list)  # "worker N exited with code C" lines of the launchers
    relayed_connections: int = 0
    leftovers: list[str] = field(default_factory=list)  # namespaces or links not removed
    logs: str = ""  # the tail of every log, for a failing assertion's message
    wall_s: float = 0.0

    @property
    def tally(self) -> budget.Tally:
        return budget.tally(self.trials)

    @property
    def overhead_s(self) -> float:
        """What the latency and loss add to one trial: median against median."""
        return statistics.median(self.latency_s) - statistics.median(self.clean_s)

    def by_number(self, number: int) -> FrozenTrial:
        return next(t for t in self.trials if t.number == number)

    def retries_of(self, number: int) -> list[FrozenTrial]:
        return [t for t in self.trials if number in record.RETRY_HISTORY.get(t, [])]


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database on the test server (dropped afterwards); yields its name."""
    engine = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"sweeper_mh_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                         "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        engine.dispose()


def _duration(trial: FrozenTrial) -> float:
    assert trial.datetime_start is not None and trial.datetime_complete is not None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _started(trial: FrozenTrial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


class _Run:
    """The state of one scenario run: hosts, logs, the study as the test sees it."""

    def __init__(self, settings: Settings, folder: Path, network: Network, relay: Relay, database: str) -> None:
        self.settings, self.folder, self.network, self.relay = settings, folder, network, relay
        port = int(ADMIN_URL.rsplit(":", 1)[1].split("/")[0])
        server = ADMIN_URL.rsplit("/", 1)[0]
        self.local_url = f"{server}/{database}"  # the test's own view, on loopback
        # What the hosts use: the relay on the bridge, in place of the database server.
        self.host_url = f"postgresql+psycopg2://postgres@{network.hub}:{port}/{database}"
        self.study_file = folder / "study.py"
        body = (textwrap.dedent(STUDY).replace("OUTPUT_DIR", str(folder / "out"))
                .replace("N_TRIALS", str(settings.n_trials)).replace("EVALS", str(settings.evals)))
        self.study_file.write_text(body)
        self.launchers: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()  # hosts lost on purpose
        self.logs: dict[str, Path] = {}
        self._study: optuna.Study | None = None
        self.started = time.time()

    # ------------------------------------------------------------------ hosts

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
        env.update(SWEEPER_STORAGE=self.host_url, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SWEEPER_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        return env

    def sweeper(self, host: Host, *args: str, log_name: str) -> subprocess.Popen[bytes]:
        log = self.folder / f"{log_name}.log"
        self.logs[log_name] = log
        with open(log, "ab") as out:
            return self.network.spawn(host, [sys.executable, "-m", "sweeper", *args], self.env(), out, cwd=ROOT)

    def create(self) -> None:
        first = self.network.hosts[0]
        code = self.sweeper(first, "create", str(self.study_file), log_name=f"create-{first.name}").wait(timeout=120)
        if code != 0:
            raise AssertionError(f"`sweeper create` on {first.name} exited with {code}:\n{self.tails()}")

    def start_workers(self) -> None:
        for host in self.network.hosts:
            self.launchers[host.name] = self.sweeper(
                host, "worker", str(self.study_file), "--workers", "1", "--heartbeat", str(HEARTBEAT_S),
                "--grace", str(GRACE_S), "-v", log_name=host.name)

    def tails(self, chars: int = 1500) -> str:
        logs = dict(self.logs)
        logs.update({f"worker log {p.name}": p for p in sorted((self.folder / "out" / "logs").glob("*.log"))})
        return "\n".join(f"--- {name}:\n{path.read_text(errors='replace')[-chars:]}"
                         for name, path in logs.items() if path.exists())

    # ------------------------------------------------------------------ the study, as seen from here

    def trials(self) -> list[FrozenTrial]:
        if self._study is None:
            self._study = optuna.load_study(study_name="multihost", storage=self.local_url)
        return self._study.get_trials(deepcopy=False)

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = min(time.time() + timeout, self.started + self.settings.deadline_s)
        while not ready():
            for name, launcher in self.launchers.items():
                if launcher.poll() not in (None, 0) and name not in self.killed:
                    raise AssertionError(f"while waiting for {what}: `sweeper worker` on {name} exited with "
                                         f"{launcher.returncode}\n{self.tails()}")
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.tails()}")
            time.sleep(0.05)

    def running_on(self, host: Host) -> FrozenTrial | None:
        """The trial ``host`` runs, if it is between its first and second evaluations (with a
        resume state): its worker's next storage call is a report, and then its end."""
        for trial in self.trials():
            if (trial.state == TrialState.RUNNING and record.HOST.get(trial) == host.name
                    and record.RESUME.get(trial) and len(trial.intermediate_values) == 1):
                return trial
        return None

    def state_of(self, number: int) -> TrialState:
        return next(t.state for t in self.trials() if t.number == number)


# ---------------------------------------------------------------------- phases


def _clean_and_latency(run: _Run, outcome: Outcome) -> None:
    settings = run.settings
    k = settings.per_phase

    def complete_since(since: float, until: float = float("inf")) -> list[FrozenTrial]:
        return [t for t in run.trials() if t.state == TrialState.COMPLETE and since <= _started(t)
                and t.datetime_complete is not None and t.datetime_complete.timestamp() <= until]

    # The first wait includes every host's start: its imports and the data cache (a minute or
    # more on a busy 2-core machine).
    run.wait_for(f"{k} trials on clean links", lambda: len(complete_since(0.0)) >= k, timeout=240)
    outcome.clean_s = [_duration(t) for t in complete_since(0.0)]
    run.relay.delay_s = settings.delay_ms / 2000  # each way
    run.network.lose(settings.loss_percent)
    since = time.time()
    try:
        run.wait_for(f"{k} trials with {settings.delay_ms:g} ms and {settings.loss_percent:g}% loss",
                     lambda: len(complete_since(since)) >= k, timeout=150)
    finally:
        until = time.time()
        run.relay.delay_s = 0.0
        run.network.clear_loss()
    outcome.latency_s = [_duration(t) for t in complete_since(since, until)]


def _freeze_mid_trial(run: _Run, host: Host) -> FrozenTrial:
    """Stop every process of ``host`` (SIGSTOP) while it runs a trial; that trial."""
    for _attempt in range(20):
        run.wait_for(f"a trial between its first two evaluations on {host.name}", lambda: run.running_on(host) is not None)
        pids = host.pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        trial = run.running_on(host)
        if trial is not None:
            return trial
        for pid in pids:  # it was between two trials: let it take the next one
            os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"{host.name} was never caught in the middle of a trial")


def _lose_host(run: _Run, outcome: Outcome) -> None:
    host = run.network.hosts[-1]
    trial = _freeze_mid_trial(run, host)
    run.killed.add(host.name)
    outcome.killed_processes = run.network.kill_host(host)
    outcome.lost_trial, outcome.lost_host = trial.number, host.name


def _partition(run: _Run, outcome: Outcome) -> None:
    host = run.network.hosts[-2]
    for _attempt in range(10):
        run.wait_for(f"a trial between its first two evaluations on {host.name}", lambda: run.running_on(host) is not None)
        run.network.cut(host)
        cut_at = time.time()
        trial = run.running_on(host)
        if trial is not None:
            break
        run.network.heal(host)  # it was between two trials
    else:
        raise AssertionError(f"{host.name} was never caught in the middle of a trial")
    number = trial.number

    def taken_elsewhere() -> bool:
        return run.state_of(number) == TrialState.FAIL and any(
            t.state != TrialState.WAITING for t in run.trials() if number in record.RETRY_HISTORY.get(t, []))

    try:
        run.wait_for(f"trial {number} of the cut-off {host.name} to be retried elsewhere", taken_elsewhere)
        time.sleep(max(0.0, GRACE_S + 1 - (time.time() - cut_at)))  # down longer than the grace period
    finally:
        run.network.heal(host)
        outcome.partition_s = time.time() - cut_at
    outcome.partitioned_trial, outcome.partitioned_host = number, host.name


def _refused_reports(run: _Run, numbers: list[int]) -> list[str]:
    """The log lines in which a late worker's report on one of ``numbers`` was refused."""
    lines = []
    for log in sorted((run.folder / "out" / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            for number in numbers:
                if (f"trial {number} was already finished when its worker told it" in line
                        or f"trial {number} was failed by another process" in line):
                    lines.append(line.strip())
    return lines


def run_scenario(folder: Path, settings: Settings | None = None) -> Outcome:
    """The whole scenario (module docstring); the hosts are gone when it returns."""
    settings = settings or Settings()
    started = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        network = stack.enter_context(Network(settings.hosts))
        database = stack.enter_context(fresh_database())
        relay = stack.enter_context(Relay((network.hub, 5432), ("127.0.0.1", 5432)))
        run = _Run(settings, folder, network, relay, database)
        outcome = Outcome(settings, [], {})
        try:
            run.create()
            run.start_workers()
            _clean_and_latency(run, outcome)
            if settings.faults:
                _lose_host(run, outcome)
                _partition(run, outcome)
            run.wait_for("every host's `sweeper worker` to finish",
                         lambda: all(p.poll() is not None for p in run.launchers.values()),
                         timeout=settings.deadline_s)
            outcome.exit_codes = {name: (None if name in run.killed else p.returncode)
                                  for name, p in run.launchers.items()}
            outcome.trials = run.trials()
            late = [n for n in (outcome.partitioned_trial,) if n is not None]
            outcome.refused = _refused_reports(run, late)
            outcome.relayed_connections = relay.connections
            outcome.crashes = [f"{name}: {line.strip()}" for name in run.launchers
                               for line in run.logs[name].read_text(errors="replace").splitlines()
                               if "exited with code" in line or "keeps failing" in line]
            outcome.logs = run.tails(4000)
        finally:
            network.close()
            outcome.leftovers = network.leftovers()
    outcome.wall_s = time.time() - started
    return outcome
