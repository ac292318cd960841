"""One worker process: claims trials of the shared study and runs them until the budget is spent.

The worker owns one trial at a time and nothing global. Its loop:

1. fail stale trials (whose worker died) so their retries are queued, not only when some
   other worker happens to start a trial (Optuna does it only then);
2. stop if the sweep's deadline or GPU-hours are spent;
3. claim a WAITING ticket (see ``budget.py``); if none is left but trials are still running
   somewhere, wait: one of them may yet be handed back for a retry;
4. run it with a heartbeat, and tell Optuna how it ended.

On SIGTERM or SIGINT the running trial saves its resume state at the next step, is failed and
re-queued as a retry with the same parameters (a *hand-back*), and the worker exits with
code 3 within a bounded time. Optuna itself leaves such a trial RUNNING until its heartbeat
goes stale.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, liveness, optuna_adapter, pbt, promotion, record
from sweeper.array_structure import fresh
from sweeper.outcome import Outcome, WorkerInfo
from sweeper.storage import mask, open_storage

if TYPE_CHECKING:
    from sweeper.study import Sweep

logger = logging.getLogger(__name__)
# fail_stale_trials has been "experimental" since Optuna 2.9; sweeper relies on it knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

EXIT_DONE = 0
EXIT_PREEMPTED = 3
POLL_SECONDS = 2.0  # how often an idle worker looks for a retry to run
IDLE_RECHECK_SECONDS = 0.5  # before an idle worker stops, it looks once more (a retry may be on its way)


def make_sampler(sweep: Sweep, seed: int) -> optuna.samplers.BaseSampler:
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "qmc":
        # Every worker draws from the same scrambled sequence (same seed), offset by trial id.
        return optuna.samplers.QMCSampler(seed=sweep.seed, scramble=True)
    # Optuna 5 defaults TPE to constant_liar and multivariate, which suits parallel workers.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, sweep.n_trials // 5)))


def make_pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    if sweep.pruner in ("none", "asha"):  # asha's rungs are promotion.py's, judged in the objective
        return optuna.pruners.NopPruner()
    # Explicit resources: "auto" can differ between processes (Optuna #1220).
    max_resource = sweep.max_evaluations or "auto"
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource, reduction_factor=3)
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, sweep.n_trials // 4)), n_warmup_steps=0)


def worker_seed(study_seed: int, worker_index: int, host_salt: str = "") -> int:
    """Distinct per worker: identical sampler seeds make workers propose identical trials
    (Optuna #4714)."""
    import hashlib

    digest = hashlib.sha256(f"{study_seed}:{worker_index}:{host_salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RetryCallback:
    """Re-queues a trial cut off by a dead or preempted worker, at most ``max_retries`` times.

    Like Optuna's ``RetryHeartbeatStaleTrialCallback`` (whose ``retried_trial_number`` and
    ``retry_history`` work on our retries too), but it does not copy the failed trial's user
    attributes: a retry starts with a clean record, and finds the resume state through its
    ``retry_history``.
    """

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        history = [*record.RETRY_HISTORY.get(trial, []), trial.number]
        if len(history) > self.max_retries:
            logger.warning("trial %d was cut off %d times: not retrying it again", trial.number, len(history))
            return
        # Optuna's own keys only: the cut-off trial's artifacts and checkpoint record are its own.
        system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith(("artifacts:", "sweeper:"))}
        if segment := record.PBT.get(trial):  # a PBT segment's retry is the same segment of the same member
            system_attrs[record.PBT.key] = pbt.for_retry(segment)
        system_attrs.update({record.FAILED_TRIAL.key: history[0], record.RETRY_HISTORY.key: history})
        retry = optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                                    distributions=trial.distributions, system_attrs=system_attrs)
        # Adding a trial is not repeated by the storage (a lost answer would add two); looking
        # for this retry first makes the whole of it safe to repeat.
        if not optuna_adapter.call_with_retries(lambda: _add_once(study, retry, history), what="queueing a retry"):
            return
        logger.info("trial %d re-queued for a retry", trial.number)


def _add_once(study: optuna.Study, retry: FrozenTrial, history: list[int]) -> bool:
    """Add ``retry`` unless a trial with the same retry history is there already."""
    if any(record.RETRY_HISTORY.get(t) == history for t in study.get_trials(deepcopy=False)):
        return False
    study.add_trial(retry)
    return True


def claim(study: optuna.Study, accept: Callable[[FrozenTrial], bool] | None = None,
          fixed: dict[str, Any] | None = None) -> optuna.Trial | None:
    """Atomically take a WAITING ticket (WAITING -> RUNNING); None if there is none. A paused
    trial that is now promoted (``pruner="asha"``, ``promotion.py``) is taken first.

    ``accept``: only a ticket it accepts (read before the claim; a trial array takes fresh
    tickets of its structure); ``fixed``: values the sampler must not propose for it (Optuna's
    ``fixed_params``), set between the claim and the first read of the trial, on a fresh ticket
    only (a retry keeps its parameters)."""
    storage = optuna_adapter.storage_of(study)
    optuna_adapter.forget_cached_trials(study)  # as Study.ask does: see every new trial
    promoted = promotion.promote(study) if accept is None else None
    if promoted is not None:
        optuna_adapter.read_study_into_cache(study)
        return optuna.Trial(study, promoted)
    for trial_id in optuna_adapter.waiting_trial_ids(study):
        if accept is not None and not accept(storage.get_trial(trial_id)):
            continue
        try:
            taken = storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if taken:
            ticket = storage.get_trial(trial_id) if fixed else None
            if fixed and ticket is not None and fresh(ticket):
                own = record.FIXED_PARAMS.get(ticket, {}) or {}
                storage.set_trial_system_attr(trial_id, record.FIXED_PARAMS.key, {**own, **fixed})
            # One read of the study now, with the claimed trial in it: the storage's cache must
            # know a trial before its parameters are set, and the sampler reuses this read.
            optuna_adapter.read_study_into_cache(study)
            return optuna.Trial(study, trial_id)
    return None


def hand_back(study: optuna.Study, trial: optuna.Trial, callback: RetryCallback, reason: str) -> None:
    """Fail ``trial`` now and queue its retry, instead of waiting for its heartbeat to go stale."""
    record.FAIL_REASON.set(trial, reason)
    callback(study, study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))


def run(
    sweep: Sweep,
    url: str,
    info: WorkerInfo,
    *,
    host_salt: str = "",
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
) -> int:
    """One worker process of ``sweep``: returns its exit code."""
    from sweeper import checkpoints, configuration
    from sweeper import storage as storage_mod
    from sweeper.objective import Objective

    # The log's first line: what follows until "joined" is the storage, then the first trial's data and model.
    logger.info("worker %d starting (pid %d, %s)", info.index, os.getpid(), info.device)
    retry = RetryCallback(sweep.max_retries)
    storage = open_storage(
        url,
        heartbeat_interval=heartbeat_interval or storage_mod.HEARTBEAT_INTERVAL_S,
        grace_period=grace_period or storage_mod.GRACE_PERIOD_S,
        stale_trial_callback=retry,
        create_tables=False,
        wait_for_server=True,  # the launcher that started this worker has opened it: an outage is passing
    )
    optuna_adapter.read_tickets_lightly(storage)  # every read of the study would reload the unclaimed tickets
    study = optuna.load_study(
        study_name=sweep.name, storage=storage,
        sampler=make_sampler(sweep, worker_seed(sweep.seed, info.index, host_salt)),
        pruner=make_pruner(sweep),
    )
    configuration.record_or_check(study, sweep)  # however this worker was started, it trains as the study says
    # The study's recorded store, so a machine that joins writes where the launcher said.
    store = checkpoints.open_store(checkpoints.location_of(sweep, study), sweep.output_path)
    stop = threading.Event()
    _install_signal_handlers(stop)
    objective = Objective(sweep, study, info, store, stop)
    run_trial: Callable[[optuna.Trial], Outcome] = objective.run
    next_ticket: Callable[[optuna.Study], optuna.Trial | None] = claim
    if sweep.array_size > 1 and sweep.train is None:
        from sweeper.array_worker import ArrayRunner

        runner = ArrayRunner(objective, study, sweep.array_size, lambda t, o: _tell(study, t, o, retry), stop,
                             heartbeat_interval or storage_mod.HEARTBEAT_INTERVAL_S, claim)
        run_trial, next_ticket = runner, runner.claim_first
    logger.info("worker %d on %s (%s) joined study %r at %s", info.index, info.host, info.device,
                sweep.name, mask(url))
    code = serve(study, run_trial, retry, stop,
                 heartbeat_interval=heartbeat_interval or storage_mod.HEARTBEAT_INTERVAL_S,
                 grace_period=grace_period or storage_mod.GRACE_PERIOD_S, name=f"worker {info.index}",
                 release=lambda trial: checkpoints.remove_resume(store, trial), claim_next=next_ticket)
    storage.dispose()  # give the connections back now, not when the process exits
    return code


def serve(
    study: optuna.Study,
    run_trial: Callable[[optuna.Trial], Outcome],
    retry: RetryCallback,
    stop: threading.Event,
    *,
    heartbeat_interval: float = 20,
    grace_period: float = 120,
    name: str = "worker",
    release: Callable[[optuna.Trial], None] | None = None,
    claim_next: Callable[[optuna.Study], optuna.Trial | None] = claim,
) -> int:
    """Claim tickets of ``study`` and run them with ``run_trial`` until the budget is spent.

    Independent of what a trial does: the fine-tuning objective and the benchmarks' trivial
    objectives go through the same claiming, heartbeats, hand-backs and retries. At the end,
    trials that ``pruner="asha"`` left paused are pruned and ``release`` deletes their resume
    states (``promotion.close``). ``claim_next`` takes the next ticket (a trial array's runner
    fixes the structure of a new array's first member there).
    """
    last_reap, idle = 0.0, False
    while not stop.is_set():
        if time.monotonic() - last_reap > max(1.0, grace_period / 4):
            last_reap = time.monotonic()
            liveness.reap(study, grace_period, retry)
        why = budget.out_of_time(study)
        if why:
            logger.info("%s stops: %s", name, why)
            break
        trial = claim_next(study)
        if trial is None:
            trials = study.get_trials(deepcopy=False)
            if not any(t.state == TrialState.RUNNING for t in trials):
                # Seen twice, a poll apart: a reaper fails a dead trial and then queues its
                # retry, and a look between the two would find nothing left to run.
                if idle:
                    promotion.close(study, release)  # no promotion can reach a paused trial now
                    logger.info("%s stops: every trial of the budget has run", name)
                    break
                idle = True
                stop.wait(IDLE_RECHECK_SECONDS)
                continue
            idle = False
            stop.wait(POLL_SECONDS)  # a running trial may still be handed back for a retry
            continue
        idle = False
        logger.info("%s starts trial %d", name, trial.number)
        try:
            liveness.mark_owner(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            # A reaper took it for dead between the claim and this first write (a stalled
            # machine); its retry is queued: take the next ticket instead.
            logger.warning("trial %d was failed by a reaper before %s could start it", trial.number, name)
            continue
        with liveness.Heartbeat(optuna_adapter.storage_of(study), optuna_adapter.trial_id(trial), heartbeat_interval):
            outcome = run_trial(trial)
        if not outcome.told:
            _tell(study, trial, outcome, retry)
        if outcome.preempted:
            return EXIT_PREEMPTED
    return EXIT_PREEMPTED if stop.is_set() else EXIT_DONE


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, retry: RetryCallback) -> None:
    if outcome.preempted:
        hand_back(study, trial, retry, outcome.reason or "preempted")
        logger.info("trial %d handed back for a retry", trial.number)
        return
    if outcome.state == TrialState.WAITING:  # paused at a rung (pruner="asha"): waits for a promotion
        promotion.park(study, trial)
        return
    try:
        optuna_adapter.tell_without_readback(study, trial, outcome.state, outcome.value)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Finished already: by a tell whose answer the connection lost (the storage repeated
        # it), or by a reaper that took this trial for dead. Either way it is not counted twice.
        logger.warning("trial %d was already finished when its worker told it", trial.number)
        return
    if outcome.state == TrialState.FAIL:
        logger.warning("trial %d failed with %s: %s", trial.number, trial.params, outcome.reason)
    elif outcome.state == TrialState.PRUNED:
        logger.info("trial %d pruned (%s)", trial.number, outcome.reason)


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        logger.info("worker %d got %s: checkpointing and handing the trial back", os.getpid(),
                    signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
