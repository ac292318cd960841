"""Per-trial overhead of sweeper's workers against a plain Optuna loop, on the same storage.

    python bench/orchestration.py                        # 16 workers, 320 trials, PostgreSQL on 127.0.0.1
    python bench/orchestration.py --workers 16 --trials 480 --repeats 3
    python bench/orchestration.py --profile              # also cProfile worker 0 of each side

A trivial objective (6 suggestions, 10 reports each followed by a pruning question whose
answer is ignored, so that every run does the same work; nothing else) isolates what the
service adds per trial. On a fresh PostgreSQL database per run,
with the same engine settings (``sweeper.storage.open_storage``), the same sampler (TPE,
a distinct seed per worker) and pruner (median):

- plain Optuna: each process runs ``study.optimize(objective, n_trials=trials / workers)``;
- plain Optuna with its heartbeat on (``heartbeat_interval=20``), for reference;
- sweeper: the launcher's tickets (``budget.ensure_tickets``, timed and counted) and each
  process running ``sweeper.worker.serve``, the loop real workers run: claiming tickets,
  reaping stale trials, the deadline and GPU-hours checks, owner records, heartbeats;
- sweeper as it was before issue 7's fix, its storage reading the unclaimed tickets in full
  at every read of the study (``optuna_adapter.read_tickets_lightly`` not applied).

Processes connect and load the study before the clock starts. Per-trial time is the span
of the trials (first start to last end, by the storage's clock, plus the tickets' creation
for sweeper) x workers / trials: the time one worker spends per trial. The ratio is
sweeper's over plain Optuna's, measured in the same run; the target is at most 1.10. The
same ratio on process wall time (start to the last process's exit) is printed too: it adds
the up to 2 s an idle sweeper worker waits for a possible retry before it leaves. Runs
alternate between the contenders, so a busy moment of the machine hurts each alike, and
the median run of each counts.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import pstats
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import common

ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def objective(trial: Any) -> float:
    lr = trial.suggest_float("learning_rate", 1e-6, 1e-3, log=True)
    wd = trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
    depth = trial.suggest_int("unfreeze_depth", 0, 12)
    lam = trial.suggest_float("pretrain_loss_weight", 1e-4, 10.0, log=True)
    trial.suggest_float("warmup_ratio", 0.0, 0.2)
    trial.suggest_categorical("batch_size", [16, 32, 64])
    value = 0.0
    pruned = False
    for step in range(10):
        value = 0.5 + 0.4 * (1 - abs(lr - 1e-4) / 1e-3) * (step + 1) / 10 - 0.01 * depth * wd + 0.001 * lam
        trial.report(value, step)
        # Asked, as a real objective asks, but not obeyed: pruning would make the amount of
        # work per trial depend on the order trials finish in, which differs between runs.
        pruned = pruned or trial.should_prune()
    return value


def worker(kind: str, url: str, name: str, index: int, n_trials: int, ready: Any, go: Any,
           out: Any, profile: str | None) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sweeper").setLevel(logging.WARNING)
    from sweeper import optuna_adapter
    from sweeper import storage as storage_mod
    from sweeper.worker import Outcome, RetryCallback, serve

    sampler = optuna.samplers.TPESampler(seed=1000 + index)
    pruner = optuna.pruners.MedianPruner()
    if kind.startswith("sweeper"):  # as sweeper.worker.run opens it
        retry = RetryCallback(3)
        storage = storage_mod.open_storage(url, heartbeat_interval=20, grace_period=120,
                                           stale_trial_callback=retry, create_tables=False)
        if kind == "sweeper":
            optuna_adapter.read_tickets_lightly(storage)
    else:
        heartbeat = 20 if kind == "optuna+heartbeat" else None
        storage = storage_mod.open_storage(url, heartbeat_interval=heartbeat, grace_period=120 if heartbeat else None,
                                           create_tables=False)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    study.get_trials(deepcopy=False)  # a warm connection, as a worker that has just started has

    def run_sweeper_trial(trial: Any) -> Any:
        try:
            return Outcome(optuna.trial.TrialState.COMPLETE, value=objective(trial))
        except optuna.TrialPruned:  # not raised by this objective; a real one may
            return Outcome(optuna.trial.TrialState.PRUNED)

    def work() -> None:
        if kind.startswith("sweeper"):
            serve(study, run_sweeper_trial, retry, threading.Event(), heartbeat_interval=20, grace_period=120,
                  name=f"worker {index}")
        else:
            study.optimize(objective, n_trials=n_trials)

    ready.release()
    go.wait()
    start = time.time()
    if profile and index == 0:
        profiler = cProfile.Profile()
        profiler.runcall(work)
        profiler.dump_stats(profile)
    else:
        work()
    out.put((start, time.time()))
    storage.engine.dispose()


def one_run(kind: str, args: argparse.Namespace, profile: str | None) -> dict[str, Any]:
    import optuna
    import sqlalchemy

    from sweeper import budget
    from sweeper import storage as storage_mod

    admin = sqlalchemy.create_engine(args.admin_url, isolation_level="AUTOCOMMIT")
    db = f"sweeper_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))
    url = args.admin_url.rsplit("/", 1)[0] + f"/{db}"
    try:
        storage = storage_mod.open_storage(url, heartbeat_interval=None, grace_period=None)
        study = optuna.create_study(study_name="bench", storage=storage, direction="maximize")
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        per_worker = args.trials // args.workers
        procs = [ctx.Process(target=worker, args=(kind, url, "bench", i, per_worker, ready, go, out, profile))
                 for i in range(args.workers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        tickets_s = 0.0
        if kind.startswith("sweeper"):  # what `sweeper launch` does first: its cost counts
            tick = time.time()
            budget.ensure_tickets(study, per_worker * args.workers)
            tickets_s = time.time() - tick
        start = time.time()
        go.set()
        spans = [out.get() for _ in procs]
        for p in procs:
            p.join()
        wall = max(end for _, end in spans) - start + tickets_s
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        # From the first trial's start to the last one's end, by the storage's own clock: what
        # the trials cost, without process exits (an idle sweeper worker looks for retries
        # every 2 s before it leaves) but with the launcher's tickets.
        span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
        span += tickets_s
        storage.engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
            ), {"n": db})
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}"'))
        admin.dispose()
    return {"wall_s": wall, "span_s": span, "tickets_s": tickets_s, "trials": len(finished),
            "per_trial_ms": 1000 * span * args.workers / max(1, len(finished)),
            "per_trial_ms_wall": 1000 * wall * args.workers / max(1, len(finished)),
            "trials_per_s": len(finished) / span}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=320, help="trials in all (a multiple of --workers)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per contender; the median counts")
    parser.add_argument("--admin-url", default=ADMIN_URL, help="a PostgreSQL database to create the run's database from")
    parser.add_argument("--profile", action="store_true", help="cProfile worker 0 of each contender (first repeat)")
    parser.add_argument("--contenders", default="optuna,optuna+heartbeat,sweeper,sweeper-full-ticket-reads")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    kinds = args.contenders.split(",")
    print(f"{args.workers} workers, {args.trials} trials, trivial objective (6 suggestions, 10 reports), "
          f"PostgreSQL; machine {common.machine()}")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    profiles: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for kind in kinds:
                profile = str(Path(tmp) / f"{kind}.prof") if args.profile and r == 0 else None
                runs[kind].append(one_run(kind, args, profile))
                if profile:
                    profiles[kind] = profile
                print(f"  {kind}: {runs[kind][-1]}")
        for kind, path in profiles.items():
            print(f"\n--- cProfile of {kind} worker 0, by cumulative time ---")
            pstats.Stats(path).sort_stats("cumulative").print_stats(30)
    rows = []
    for kind in kinds:
        ordered = sorted(runs[kind], key=lambda x: x["per_trial_ms"])
        median = ordered[len(ordered) // 2]
        rows.append({"contender": kind, **median})
    base, base_wall = rows[0]["per_trial_ms"], rows[0]["per_trial_ms_wall"]
    for row in rows:
        row["x optuna"] = row["per_trial_ms"] / base
        row["x optuna, process wall"] = row["per_trial_ms_wall"] / base_wall
    print(common.table(rows, ["contender", "per_trial_ms", "x optuna", "x optuna, process wall", "trials_per_s",
                              "span_s", "wall_s", "tickets_s", "trials"]))
    if args.json:
        common.finish(args, {"machine": common.machine(), "workers": args.workers, "trials": args.trials,
                             "runs": runs, "rows": rows})


if __name__ == "__main__":
    main()
