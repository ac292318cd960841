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
import re
import shlex
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna

from sweeper import budget, checkpoints, configuration, finalize, liveness, optuna_adapter, processes, record
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
EXIT_NOTHING_COMPLETED = 1  # the launcher's exit code when trials failed and none completed
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


def log_name(index: int, join: bool) -> str:
    """A worker's log file. Workers that join from other machines (``sweeper worker``, one per
    container under compose) often share the logs folder and number their workers from 0 as
    well: their host's name keeps each one's log its own."""
    if not join:
        return f"worker-{index}.log"
    host = re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"
    return f"worker-{index}-{host}.log"


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
        configuration.record_or_check(study, sweep, options.study_path)
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
    configuration.record_or_check(study, sweep, options.study_path)  # before a ticket is added
    checkpoints.record_location(study, sweep)  # Optuna does not record the artifact store
    n_trials = options.n_trials or sweep.n_trials
    first, _ = space_mod.first_trial_params(sweep.space, sweep.first_trials)  # checked when the study loaded
    # scheduler="pbt": the first segment of each member now; each later one as the one before it ends.
    queue = pbt_population(study, sweep, options, n_trials) if sweep.scheduler == "pbt" else None
    added = budget.ensure_tickets(study, n_trials, first, queue=queue)
    n_trials = record.N_TRIALS.get(study) or n_trials  # the budget in effect: it never shrinks
    timeout = options.timeout or sweep.timeout
    gpu_hours = options.gpu_hours or sweep.gpu_hours
    record.DEADLINE.set(study, time.time() + timeout if timeout else None)
    record.GPU_SECONDS_BUDGET.set(study, gpu_hours * 3600 if gpu_hours else None)
    logger.info("study %r: budget %d trials (%d new tickets)", sweep.name, n_trials, added)
    return study


def pbt_population(study: optuna.Study, sweep: Sweep, options: LaunchOptions, n_trials: int) -> int:
    """The members of a PBT sweep: the ones its first launch started, so that a relaunch with
    more or fewer workers goes on with the same population; at the first launch, `population`,
    or else one member per worker slot (issue 16)."""
    recorded = record.POPULATION.get(study)
    if recorded is not None:
        return int(recorded)
    if sweep.population is not None:
        population, source = sweep.population, "`population`"
    else:
        population = len(plan_slots(options))
        source = f"the population (one member per worker slot, --workers {population})"
    problems = sweep.pbt_budget_problems(population, source, n_trials)
    if problems:
        raise SweepError(problems[0])
    record.POPULATION.set(study, population)
    logger.info("scheduler pbt: a population of %d members", population)
    return population


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
            if item.partition("=")[0].strip() != "storage":  # the URL goes by the environment, above
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
        slot.log = self.logs / log_name(slot.index, self.options.join)
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
        if not self.options.join and (note := budget_note(study, self.sweep, self.options)):
            self._say(note)
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
        failures = failures_line(study.get_trials(deepcopy=False))
        # When nothing completed, finalize has only "no best trial" to say: the failures say more.
        finalize.finish(self.sweep, self.options.url, say=self._say if failures is None else _silent)
        if failures is not None:
            self._say(failures)
            return EXIT_NOTHING_COMPLETED
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
        # Until the first trial runs, workers load the study, the data and the model: say so.
        self._trial_seen = self._trial_seen or any(
            t.datetime_start is not None and t.datetime_start.timestamp() >= self.started for t in trials)
        if alive and not self._trial_seen:
            line += " starting (loading the data and the model)"
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
    _trial_seen = False  # whether a trial of this launch's workers has been seen running


def budget_note(study: optuna.Study, sweep: Sweep, options: LaunchOptions) -> str | None:
    """The truth when the budget asked for is below what the study holds already (issue 17.7):
    tickets queued or run are never taken back, so the budget in effect is the larger."""
    asked = options.n_trials or sweep.n_trials
    in_effect = record.N_TRIALS.get(study)
    if in_effect is None or in_effect <= asked:
        return None
    source = f"--n-trials {asked}" if options.n_trials else f"the study's n_trials ({asked})"
    return (f"{source} is below the {in_effect} trials the study {sweep.name!r} already has queued or run, "
            f"so its budget stays {in_effect}: a budget only grows (raise it with --n-trials above "
            f"{in_effect}, or give the study another `name` for a smaller sweep)")


def finish_spent_budget(sweep: Sweep, options: LaunchOptions, say: Callable[[str], None]) -> int | None:
    """A sweep launched again after its whole budget finished (issue 18.5): say so, and how to
    extend it, instead of starting workers that would find nothing to run; return the exit code
    the launch would have ended with. None, with nothing said, when there is something to run:
    a larger ``--n-trials``, trials waiting or running, or no study yet (nothing is created here)."""
    if options.url.startswith("sqlite:///") and not Path(options.url[len("sqlite:///"):]).exists():
        return None
    storage = open_storage(options.url, heartbeat_interval=None, grace_period=None, create_tables=not options.join)
    try:
        try:
            study = optuna.load_study(study_name=sweep.name, storage=storage)
        except KeyError:
            return None
        return _say_spent(sweep, options, study, say)
    finally:
        storage.dispose()


def _say_spent(sweep: Sweep, options: LaunchOptions, study: optuna.Study, say: Callable[[str], None]) -> int | None:
    trials = study.get_trials(deepcopy=False)
    tally = budget.tally(trials)
    n_trials = max(options.n_trials or sweep.n_trials, record.N_TRIALS.get(study) or 0)  # a budget only grows
    if tally.waiting or tally.running or tally.finished < n_trials:
        return None
    configuration.record_or_check(study, sweep, options.study_path)  # a changed study file is still refused
    best = record.best(trials, study.direction)
    best_text = f"; best trial {best.number}: {sweep.metric} {best.value:.4f}" if best else ""
    again = ["sweeper", "create" if options.join else "launch", options.study_path]
    if options.overrides:
        again += ["--set", *options.overrides]
    say(f"the study {sweep.name!r} has spent its budget: {tally.finished} of {n_trials} trials finished "
        f"({tally.complete} complete, {tally.pruned} pruned, {tally.failed} failed){best_text}; no worker "
        f"was started. To run {n_trials} more, raise the budget (trials in all): "
        f"`{mask(shlex.join([*again, '--n-trials', str(2 * n_trials)]))}`")  # a --set storage= may hold a password
    if (failures := failures_line(trials)) is not None:
        say(failures)
        return EXIT_NOTHING_COMPLETED  # as the launch that ran them ended
    scored = record.BEST_TEST.get(study)
    if best is not None and (scored is None or scored.get("trial") != best.number):
        finalize.finish(sweep, options.url, say=say)  # the last launch stopped before it scored the best
    return 0


def failures_line(trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """One line naming the failures when trials failed and none completed; None otherwise."""
    tally = budget.tally(trials)
    if tally.complete or not tally.failed:
        return None
    replaced = budget.superseded(trials)
    by_reason: dict[str, list[str]] = {}
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and t.number not in replaced:
            reason = " ".join(str(record.FAIL_REASON.get(t) or "no reason recorded").split())[:200]
            by_reason.setdefault(reason, []).append(str(t.number))
    causes = [f"{reason} (trial{'s' if len(numbers) > 1 else ''} {', '.join(numbers)})"
              for reason, numbers in list(by_reason.items())[:3]]
    more = f"; and {len(by_reason) - 3} other reasons" if len(by_reason) > 3 else ""
    return (f"no trial completed: {tally.failed} failed" + (f", {tally.pruned} pruned" if tally.pruned else "")
            + f": {'; '.join(causes)}{more} (`sweeper status` lists each; exit code {EXIT_NOTHING_COMPLETED})")


def _silent(message: str) -> None:
    """A ``say`` that says nothing."""


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
