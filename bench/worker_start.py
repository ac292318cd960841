"""Worker start-up: workers forked from the template against fresh interpreters, in one run.

    python bench/worker_start.py                                   # tiny model, 2 workers, CPU
    python bench/worker_start.py --model minilm                    # the offline MiniLM-L6 and SST-2
    python bench/worker_start.py --model minilm --workers 6 --workers-per-gpu 6   # on a GPU machine

The same small sweep (``--trials-per-worker`` short trials for each worker) goes through the
real ``sweeper launch`` twice per repeat, once with ``SWEEPER_WORKER_START=fresh`` (every worker
a new interpreter that imports torch and transformers itself: sweeper before the template) and
once with ``=template`` (every worker forked from one process that imported them while the
launcher prepared the data), in alternating order so that neither side always runs on a warm
disk cache. From the storage it reads when each trial started and which process ran it:

- *first result*: seconds from the command's start to the end of the first trial (what a user
  waits for the first figure; a worker's first trial also pays for whatever it imports lazily,
  transformers' model code above all, so the start of a trial alone would flatter fresh workers);
- *every worker's first*: to the end of the first trial of the last worker to finish one;
- *launch*: the whole command, which includes the sweep's own training and the held-out test
  of the best trial (the same work on both sides).

The medians over the repeats are printed with the ratio template / fresh (below 1 is faster).
The launcher's own start (importing torch, tokenising) is on both sides' clocks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import common

from sweeper import record

TINY = """
    from sweeper import Int, LogFloat, Sweep, SyntheticText, TinyTextClassifier

    sweep = Sweep(
        name="start", output_dir=OUTPUT_DIR,
        model=TinyTextClassifier(layers=2, hidden=64, heads=2),
        data=SyntheticText(n_train=200, n_test=100),
        space={"learning_rate": LogFloat(1e-4, 1e-2), "unfreeze_depth": Int(0, 2)},
        pretrain_loss="none", epochs=1, n_trials=N_TRIALS, pruner="none", keep=1,
    )
"""

FIGURES = ("first_result_s", "every_workers_first_s", "launch_s")

MINILM = """
    from sweeper import Int, LogFloat, Sweep, TextClassifier, TextData

    sweep = Sweep(
        name="start", output_dir=OUTPUT_DIR,
        model=TextClassifier(MODEL),
        data=TextData(DATA, max_length=64, max_train_samples=256, validation_fraction=0.01),
        space={"learning_rate": LogFloat(1e-5, 1e-4), "unfreeze_depth": Int(0, 2)},
        pretrain_loss="none", epochs=1, n_trials=N_TRIALS, pruner="none", keep=1,
    )
"""


def write_study(folder: Path, model: str, n_trials: int) -> Path:
    body = TINY if model == "tiny" else MINILM
    body = (body.replace("OUTPUT_DIR", repr(str(folder / "out"))).replace("N_TRIALS", str(n_trials))
            .replace("MODEL", repr(str(common.minilm()))).replace("DATA", repr(str(common.sst2()))))
    path = folder / "study.py"
    path.write_text(textwrap.dedent(body))
    return path


def one_launch(folder: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import optuna

    n_trials = args.workers * args.trials_per_worker
    study = write_study(folder, args.model, n_trials)
    env = {**os.environ, "SWEEPER_WORKER_START": mode}
    env.pop("SWEEPER_STORAGE", None)
    command = [sys.executable, "-m", "sweeper", "launch", str(study), "--workers", str(args.workers)]
    if args.workers_per_gpu > 1:
        command += ["--workers-per-gpu", str(args.workers_per_gpu)]
    started = time.time()
    done = subprocess.run(command, env=env, cwd=common.ROOT, capture_output=True, text=True, check=False)
    wall = time.time() - started
    if done.returncode:
        raise SystemExit(f"sweeper launch ({mode}) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name="start", storage=f"sqlite:///{folder / 'out' / 'study.db'}").trials
    first_by_worker: dict[int, float] = {}
    for trial in trials:
        if trial.datetime_complete is None:
            continue
        at = trial.datetime_complete.timestamp() - started
        pid = int(record.PID.get(trial))
        first_by_worker[pid] = min(at, first_by_worker.get(pid, at))
    # A worker forked from a template that had touched CUDA starts afresh and says so (processes.py).
    fallbacks = sum(log.read_text(errors="replace").count("starts as a fresh interpreter instead")
                    for log in (folder / "out" / "logs").glob("worker-*.log"))
    return {"mode": mode, "first_result_s": min(first_by_worker.values()),
            "every_workers_first_s": max(first_by_worker.values()), "launch_s": wall,
            "workers_seen": len(first_by_worker), "trials": len(trials), "fresh_fallbacks": fallbacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny",
                        help="tiny: a small random BERT (transformers' code, no weights to read); "
                             "minilm: the offline MiniLM-L6 on SST-2 (default tiny)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="as for sweeper launch (default 1)")
    parser.add_argument("--trials-per-worker", type=int, default=2, help="short trials per worker (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="launches per mode (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sweeper-start-") as tmp:
        for repeat in range(args.repeats):
            order = ("fresh", "template") if repeat % 2 == 0 else ("template", "fresh")
            for mode in order:
                folder = Path(tmp) / f"{mode}-{repeat}"
                folder.mkdir()
                run = one_launch(folder, args, mode)
                runs.append(run)
                print(f"repeat {repeat + 1}, {mode:8s}: first result after {run['first_result_s']:.2f} s, "
                      f"every one of {run['workers_seen']} workers' first after {run['every_workers_first_s']:.2f} s, "
                      f"launch {run['launch_s']:.2f} s"
                      + (f"; {run['fresh_fallbacks']} workers had to start afresh" if run["fresh_fallbacks"] else ""),
                      flush=True)

    rows = []
    for mode in ("fresh", "template"):
        mine = [r for r in runs if r["mode"] == mode]
        rows.append({"workers start as": mode, **{key: statistics.median(r[key] for r in mine)
                                                   for key in FIGURES}})
    fresh, template = rows
    ratios = {key: template[key] / fresh[key] for key in FIGURES}
    rows.append({"workers start as": "ratio template / fresh", **ratios})
    print(f"\n{args.model}, {args.workers} workers, {args.trials_per_worker} trials each, median of {args.repeats}:")
    print(common.table(rows, ["workers start as", *FIGURES]))
    common.finish(args, {"machine": common.machine(), "settings": vars(args), "runs": runs, "medians": rows[:2],
                         "ratios": ratios})


if __name__ == "__main__":
    main()
