"""The launcher: owns the worker processes of one machine.

It creates the study (or resumes it), turns the budget into tickets, starts N workers with
their GPUs (``CUDA_VISIBLE_DEVICES``, round-robin, ``--workers-per-gpu`` per GPU), restarts a
worker that died, fails stale trials itself so that a dead worker's trial is retried once its
grace period passes, shows live progress, and on Ctrl-C or SIGTERM stops every worker
cleanly: each hands its running trial back for a retry, so launching again resumes. Workers
are forked from a template process that has imported PyTorch once (``processes.py``).
``sweeper worker`` runs the same launcher in *join* mode: it never creates the study or
changes its budget.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna

from sweeper import budget, checkpoints, finalize, liveness, optuna_adapter, processes, record
from sweeper import space as space_mod
from sweeper import storage as storage_mod
from sweeper.errors import SweepError
from sweeper.finetune import rules
from sweeper.storage import ENV_STORAGE, mask, open_storage
from sweeper.study import Sweep
from sweeper.worker import RetryCallback

logger = logging.getLogger(__name__)
# fail_stale_trials has been "experimental" since Optuna 2.9; sweeper relies on it knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

RESTART_LIMIT = 10  # restarts of one worker slot before the launcher gives up on it
QUICK_DEATH_S = 60.0  # a worker that dies this soon after starting is crash-looping
QUICK_DEATH_LIMIT = 3  # ... and after this many such deaths in a row the sweep stops
EXIT_USAGE = 2  # a worker exits with this when the study itself is wrong: never restart
STOP_TIMEOUT_S = 120.0  # after Ctrl-C, how long workers get to hand their trials back


@dataclass
class LaunchOptions:
    study_path: str
    overrides: list[str]
    url: str
    workers: int | None = None
    workers_per_gpu: int = 1
    gpus: list[str] | None = None  # physical GPU ids; None = every visible one
    n_trials: int | None = None
    timeout: float | None = None
    gpu_hours: float | None = None
    join: bool = False  # `sweeper worker`: join an existing study, never create or re-budget
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    stop_timeout: float = STOP_TIMEOUT_S
    progress: TextIO | None = None  # where the live progress goes (the CLI passes stderr)

    def __post_init__(self) -> None:
        # Every bad budget or liveness option at once, before anything is created (issue 17.7).
        # The budget flags override the study's settings: the study's own rules judge them.
        problems = [message for flag, name in (("--n-trials", "n_trials"), ("--timeout", "timeout"),
                                               ("--gpu-hours", "gpu_hours"))
                    if (value := getattr(self, name)) is not None
                    and (message := rules.rule_of(Sweep, name).problem(flag, value))]
        for flag, count in (("--workers", self.workers), ("--heartbeat", self.heartbeat_interval)):
            if count is not None and count < 1:
                problems.append(f"`{flag}` is {count}: use 1 or more")
        beat = self.heartbeat_interval or storage_mod.HEARTBEAT_INTERVAL_S
        if self.grace_period is not None and self.grace_period <= beat:
            problems.append(f"`--grace` is {self.grace_period} s, not above the heartbeat interval ({beat} s): "
                            f"live trials would be failed as dead; use more than {beat}")
        if problems:
            raise SweepError("; ".join(problems))


@dataclass
class Slot:
    index: int
    gpu: str | None
    process: processes.WorkerProcess | None = None
    restarts: int = 0
    started_at: float = 0.0
    quick_deaths: int = 0  # consecutive deaths within QUICK_DEATH_S of a start
    finished: bool = False
    log: Path | None = None


def visible_gpus() -> list[str]:
    """Physical GPU ids this machine offers (honouring an existing CUDA_VISIBLE_DEVICES)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]


def plan_slots(options: LaunchOptions, available: list[str] | None = None) -> list[Slot]:
    """Worker slots and their GPUs: worker i gets GPU i mod G (round-robin), at most
    ``workers_per_gpu`` per GPU; CPU workers when the machine has no GPU."""
    available = visible_gpus() if available is None else available
    if options.gpus is not None:
        missing = [g for g in options.gpus if g not in available]
        if missing:
            have = ",".join(available) if available else "none"
            raise SweepError(f"--gpus {','.join(options.gpus)} names GPU {','.join(missing)}, which this "
                             f"machine does not have (visible: {have}): pick from the visible ones, "
                             "or leave out --gpus")
    gpus = options.gpus if options.gpus is not None else available
    if options.workers_per_gpu < 1:
        raise SweepError(f"--workers-per-gpu is {options.workers_per_gpu}: use 1 or more")
    count = options.workers if options.workers is not None else (len(gpus) * options.workers_per_gpu if gpus else 1)
    if gpus and count > len(gpus) * options.workers_per_gpu:
        raise SweepError(f"--workers {count} needs more than {options.workers_per_gpu} worker(s) on "
                         f"each of the {len(gpus)} GPU(s): raise --workers-per-gpu to "
                         f"{-(-count // len(gpus))} or lower --workers")
    return [Slot(i, gpus[i % len(gpus)] if gpus else None) for i in range(count)]


def prepare_study(sweep: Sweep, options: LaunchOptions) -> optuna.Study:
    """Create or resume the study and set its budget (launch), or check that it exists (join)."""
    storage = open_storage(options.url, heartbeat_interval=None, grace_period=None, create_tables=not options.join)
    direction = record.direction_of(sweep.direction)  # the study check made sure it is one
    if options.join:
        try:
            study = optuna.load_study(study_name=sweep.name, storage=storage)
        except KeyError:
            raise SweepError(f"the study {sweep.name!r} does not exist in {mask(options.url)}: start it "
                             f"with `sweeper launch {options.study_path}` first, then join") from None
        return study
    # Creating a study is not repeated by the storage (a lost answer would make the repeat
    # fail as a duplicate); with load_if_exists the whole call is safe to repeat.
    study = optuna_adapter.call_with_retries(
        lambda: optuna.create_study(study_name=sweep.name, storage=storage, direction=direction, load_if_exists=True),
        what="creating the study")
    if study.direction != direction:
        raise SweepError(f"the study {sweep.name!r} in {mask(options.url)} already exists with direction "
                         f"{study.direction.name.lower()}, but the study file says {sweep.direction}: use "
                         "another `name` for a new sweep")
    record.STUDY_CONFIG.set(study, sweep.to_dict())
    checkpoints.record_location(study, sweep)  # Optuna does not record the artifact store
    n_trials = options.n_trials or sweep.n_trials
    first, _ = space_mod.first_trial_params(sweep.space, sweep.first_trials)  # checked when the study loaded
    added = budget.ensure_tickets(study, n_trials, first)
    timeout = options.timeout or sweep.timeout
    gpu_hours = options.gpu_hours or sweep.gpu_hours
    record.DEADLINE.set(study, time.time() + timeout if timeout else None)
    record.GPU_SECONDS_BUDGET.set(study, gpu_hours * 3600 if gpu_hours else None)
    logger.info("study %r: budget %d trials (%d new tickets)", sweep.name, n_trials, added)
    return study


class Launcher:
    def __init__(self, sweep: Sweep, options: LaunchOptions, starter: processes.Starter | None = None) -> None:
        self.sweep = sweep
        self.options = options
        self.slots = plan_slots(options)
        self.stopping = False
        self.started = time.time()
        self.logs = sweep.output_path / "logs"
        self._retry = RetryCallback(sweep.max_retries)
        self.starter = starter or processes.starter()

    # ------------------------------------------------------------------ processes

    def _spawn(self, slot: Slot) -> None:
        env = dict(os.environ)
        env[ENV_STORAGE] = self.options.url  # via the environment: a password stays out of `ps`
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu if slot.gpu is not None else ""
        env["PYTHONUNBUFFERED"] = "1"
        # Workers share the cores: one BLAS pool per worker with all the cores oversubscribes.
        env.setdefault("SWEEPER_THREADS", str(max(1, (os.cpu_count() or 1) // len(self.slots))))
        argv = ["_work", self.options.study_path, "--index", str(slot.index)]
        for item in self.options.overrides:
            argv += ["--set", item]
        if slot.gpu is not None:
            argv += ["--gpu", slot.gpu]
        if self.options.join:
            argv += ["--join"]
        if self.options.heartbeat_interval:
            argv += ["--heartbeat", str(self.options.heartbeat_interval)]
        if self.options.grace_period:
            argv += ["--grace", str(self.options.grace_period)]
        self.logs.mkdir(parents=True, exist_ok=True)
        slot.log = self.logs / f"worker-{slot.index}.log"
        slot.started_at = time.time()
        slot.process = self.starter.start(argv, env, slot.log)  # in its own session: Ctrl-C reaches us, not them
        logger.info("worker %d started (pid %d, %s)", slot.index, slot.process.pid,
                    f"GPU {slot.gpu}" if slot.gpu is not None else "CPU")

    def _check(self, slot: Slot) -> None:
        if slot.finished or slot.process is None:
            return
        code = slot.process.poll()
        if code is None:
            return
        if code == 0 or self.stopping:
            slot.finished = True
            return
        # Its trial goes back to the budget now, not after the heartbeat's grace period.
        try:
            liveness.reap_dead(self._reaper(), [slot.process.pid], self._retry)
        except Exception as exc:  # the storage is down: the heartbeat will catch it later
            logger.warning("cannot fail the trial of dead worker %d yet: %s", slot.index, mask(str(exc))[:160])
        slot.quick_deaths = slot.quick_deaths + 1 if time.time() - slot.started_at < QUICK_DEATH_S else 0
        if code == EXIT_USAGE or slot.quick_deaths >= QUICK_DEATH_LIMIT:
            # Every worker would die the same way: stop, and show why.
            raise SweepError(f"worker {slot.index} keeps failing (exit code {code}): "
                             f"{last_error_line(slot.log)} (full log: {slot.log})")
        # Died (killed, crashed, or preempted on its own): the trial it held is handed back or
        # will be retried once stale; the budget is not spent, so the slot gets a new worker.
        slot.restarts += 1
        if slot.restarts > RESTART_LIMIT:
            slot.finished = True
            logger.error("worker %d died %d times; not restarting it (see %s)", slot.index,
                         slot.restarts, slot.log)
            return
        logger.warning("worker %d exited with code %s; restarting it (see %s)", slot.index, code, slot.log)
        self._spawn(slot)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every worker to hand its trial back and exit (the first Ctrl-C)."""
        self.stopping = True
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                try:
                    slot.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:  # gone since the poll
                    pass

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.kill()

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        study = prepare_study(self.sweep, self.options)
        grace = self.options.grace_period or storage_mod.GRACE_PERIOD_S
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        interrupts = {"count": 0}

        def on_signal(signum: int, frame: Any) -> None:
            interrupts["count"] += 1
            if interrupts["count"] == 1:
                self._say("stopping: each worker checkpoints its trial and hands it back "
                          "(Ctrl-C again to kill them now)")
                self.stop(signum)
            else:
                self._kill_all()

        for s in previous:
            signal.signal(s, on_signal)
        try:
            for slot in self.slots:
                self._spawn(slot)
            self._supervise(study, grace)
        except BaseException:
            self.stop()
            self._wait_or_kill(10.0)
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self._show_progress(study, final=True)
        if self.stopping:
            return 130
        finalize.finish(self.sweep, self.options.url, say=self._say)
        return 0

    def _wait_or_kill(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline and any(s.process and s.process.poll() is None for s in self.slots):
            time.sleep(0.2)
        self._kill_all()

    def _supervise(self, study: optuna.Study, grace: float) -> None:
        """Until every worker has finished: restart the dead, reap stale trials, show progress."""
        stop_deadline: float | None = None
        last_reap, last_progress = 0.0, 0.0
        while not all(slot.finished for slot in self.slots):
            for slot in self.slots:
                self._check(slot)
            now = time.time()
            if now - last_reap > max(1.0, grace / 4):
                last_reap = now
                # Optuna fails stale trials only when a worker starts a new trial; do it here
                # too, so a dead worker's trial is retried even when every worker is busy.
                try:
                    liveness.reap(self._reaper(), grace, self._retry)
                except Exception as exc:  # the storage is down: workers retry on their own
                    logger.warning("cannot check for stale trials: %s", mask(str(exc))[:160])
            if now - last_progress > 2.0:
                last_progress = now
                self._show_progress(study)
            if self.stopping and stop_deadline is None:
                stop_deadline = now + self.options.stop_timeout
            if stop_deadline is not None and now > stop_deadline:
                logger.warning("workers did not stop within %.0fs; killing them", self.options.stop_timeout)
                self._kill_all()
            time.sleep(0.5)

    _reaper_study: optuna.Study | None = None

    def _reaper(self) -> optuna.Study:
        """A study handle whose storage knows the heartbeat settings and the retry callback."""
        if self._reaper_study is None:
            storage = open_storage(
                self.options.url,
                heartbeat_interval=self.options.heartbeat_interval or storage_mod.HEARTBEAT_INTERVAL_S,
                grace_period=self.options.grace_period or storage_mod.GRACE_PERIOD_S,
                stale_trial_callback=self._retry,
                create_tables=False,
                wait_for_server=True,  # prepare_study opened it: an outage is passing
            )
            self._reaper_study = optuna.load_study(study_name=self.sweep.name, storage=storage)
        return self._reaper_study

    # ------------------------------------------------------------------ progress

    def _say(self, message: str) -> None:
        stream = self.options.progress
        if stream is not None:
            if stream.isatty():
                stream.write("\r\033[K")
            stream.write(message + "\n")
            stream.flush()

    def _show_progress(self, study: optuna.Study, final: bool = False) -> None:
        stream = self.options.progress
        if stream is None:
            return
        try:
            with optuna_adapter.patience(5.0):  # a progress line can wait for the next round
                trials = study.get_trials(deepcopy=False)
        except Exception:
            return
        line = progress_line(trials, study.direction, time.time() - self.started)
        alive = sum(1 for s in self.slots if s.process is not None and s.process.poll() is None)
        line += f" | {alive} worker{'s' if alive != 1 else ''}"
        if stream.isatty():
            stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            # A log file gets a line when something changed, and at least every minute.
            key = line.split(", best")[0] + line.split(" elapsed")[-1].split("|")[-1]
            if final or key != self._last_key or time.time() - self._last_print > 60:
                self._last_key, self._last_print = key, time.time()
                stream.write(line + "\n")
        stream.flush()

    _last_key = ""
    _last_print = 0.0


def last_error_line(log: Path | None) -> str:
    """The most telling line of a worker's log: its last error or exception."""
    if log is None or not log.exists():
        return "no log"
    lines = [text.strip() for text in log.read_text(errors="replace").splitlines() if text.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return mask(line)[:400]
    return mask(lines[-1])[:400] if lines else "empty log"


def progress_line(trials: list[optuna.trial.FrozenTrial], direction: optuna.study.StudyDirection,
                  elapsed: float) -> str:
    t = budget.tally(trials)
    total = t.spent
    best = record.best(trials, direction)
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "best -"
    eta = ""
    if t.finished and t.finished < total:
        per_trial = elapsed / t.finished
        eta = f", ~{_duration(per_trial * (total - t.finished))} left"
    return (f"{t.finished}/{total} done ({t.complete} complete, {t.pruned} pruned, {t.failed} failed), "
            f"{t.running} running, {best_text}, {_duration(elapsed)} elapsed{eta}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
