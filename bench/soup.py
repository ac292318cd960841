"""Weight soups against the best single trial: a MiniLM-L6 sweep on SST-2, several study seeds.

    python bench/soup.py                                  # CPU-sized: 3 runs x the three head inits
    python bench/soup.py --runs 2 --head-init shared      # fewer runs, one setting
    python bench/soup.py --device cuda --train 20000 --trials 12 --runs 5

Each run is one study seed: ``sweeper launch`` of a sweep of ``--trials`` trials that keeps
every checkpoint, then ``sweeper best --soup greedy --evaluate`` and ``--soup uniform
--evaluate`` through the real CLI. Selection uses the study's own validation split only (whole
SST-2 training sentences and their phrases held out: ``validation_split="sentences"``);
SST-2 validation (872 sentences) is the held-out test, scored once per model. With
``--seeds N`` the first run also trains its best configuration again with N other seeds
(``sweeper best --seeds``), for the seed spread of one configuration.

What is cut for a 2-core CPU (``--train``, ``--max-length``, ``--epochs``, the depth range):
2,000 training examples of the 67,349, inputs cut at 64 tokens, 1 epoch evaluated once,
batch 32, only the top 2 to 4 of MiniLM's 6 blocks train, 6 trials per run, 3 runs. Each run is printed as it ends and
the figures are written to ``--json`` after every run, so a cut-short benchmark keeps its
finished runs.

Printed: per run, the best single trial, the greedy and the uniform soup on validation and
test; then, per head-init setting, the mean of each over runs with its standard error, and
the greedy soup's gain over the best trial on test with its standard error over runs. The
target (issue 19): the gain is positive on average and in no run below minus one standard
error of a test figure (the binomial standard error on 872 sentences, about 1.3 points).
"""

from __future__ import annotations

import argparse
import json
import math
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

STUDY = """
    from sweeper import Int, LogFloat, Sweep, TextClassifier, TextData

    sweep = Sweep(
        name="soup-bench",
        model=TextClassifier({model!r}),
        data=TextData({data!r}, train="train", test="validation", max_length={max_length},
                      validation_split="sentences", validation_fraction={validation_fraction},
                      max_train_samples={train}),
        space={{
            "learning_rate": LogFloat(3e-5, 3e-4),
            "weight_decay": LogFloat(1e-4, 1e-1),
            "unfreeze_depth": Int({min_depth}, {max_depth}),
            "batch_size": 32,
            "warmup_ratio": 0.1,
        }},
        epochs={epochs},
        evals_per_epoch=1,
        n_trials={trials},
        keep={trials},
        pruner="none",
        sampler="random",
        seed={seed},
        head_init={head_init!r},
        bf16=False,
        output_dir={output!r},
    )
"""


def sweeper(*args: str, env: dict[str, str]) -> str:
    """The real CLI; its last line of output, or a SystemExit with its error."""
    done = subprocess.run([sys.executable, "-m", "sweeper", *args], capture_output=True, text=True, env=env,
                          cwd=common.ROOT)
    if done.returncode:
        raise SystemExit(f"sweeper {' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def one_run(args: argparse.Namespace, seed: int, head_init: str, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    import optuna

    from sweeper import record

    study = folder / "study.py"
    study.write_text(textwrap.dedent(STUDY.format(
        model=str(common.minilm()), data=str(common.sst2()), max_length=args.max_length, train=args.train,
        validation_fraction=args.validation_fraction, min_depth=args.depths[0], max_depth=args.depths[1],
        epochs=args.epochs, trials=args.trials, seed=seed, head_init=head_init, output=str(folder / "out"))))
    started = time.time()
    sweeper("launch", str(study), "--workers", str(args.workers), env=env)
    swept = time.time() - started
    soups = {}
    for method in ("greedy", "uniform"):
        sweeper("best", str(study), "--soup", method, "--evaluate", "--out", str(folder / method), env=env)
        soups[method] = json.loads((folder / method / "soup.json").read_text())
    seeds = None
    if args.seeds and seed == args.first_seed and head_init == args.head_init[0]:
        sweeper("best", str(study), "--seeds", str(args.seeds), "--workers", str(args.workers),
                "--out", str(folder / "seeds"), env=env)
        seeds = json.loads((folder / "seeds" / "seeds.json").read_text())
    loaded = optuna.load_study(study_name="soup-bench", storage=f"sqlite:///{folder / 'out' / 'study.db'}")
    best_test = record.BEST_TEST.get(loaded)
    g, u = soups["greedy"], soups["uniform"]
    return {
        "seed": seed, "head_init": head_init, "sweep_seconds": round(swept, 1),
        "best_trial": g["best_trial"], "best_validation": g["best_validation"], "best_test": best_test["value"],
        "greedy_members": [m["trial"] for m in g["members"]], "greedy_validation": g["validation"],
        "greedy_test": g["test"], "greedy_steps": g["steps"],
        "uniform_validation": u["validation"], "uniform_test": u["test"],
        "trial_validation": {str(t.number): t.value for t in loaded.trials if t.value is not None},
        "seeds": seeds,
    }


def summary(runs: list[dict[str, Any]], test_size: int) -> list[dict[str, Any]]:
    rows = []
    for head_init in sorted({r["head_init"] for r in runs}):
        mine = [r for r in runs if r["head_init"] == head_init]
        row: dict[str, Any] = {"head_init": head_init, "runs": len(mine)}
        for name in ("best_validation", "best_test", "greedy_validation", "greedy_test", "uniform_validation",
                     "uniform_test"):
            row[name] = statistics.fmean(r[name] for r in mine)
        gains = [r["greedy_test"] - r["best_test"] for r in mine]
        row["greedy_gain_test"] = statistics.fmean(gains)
        row["gain_stderr"] = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else float("nan")
        row["uniform_gain_test"] = statistics.fmean(r["uniform_test"] - r["best_test"] for r in mine)
        # One standard error of a test figure: binomial, on the held-out sentences.
        row["worst_run_in_test_stderrs"] = min(
            g / math.sqrt(r["best_test"] * (1 - r["best_test"]) / test_size) for g, r in zip(gains, mine))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.device_arg(parser)
    parser.add_argument("--runs", type=int, default=3, help="study seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--head-init", nargs="+", default=["probe", "shared", "trial"], choices=("shared", "trial", "probe"),
                        help="the settings to compare (default all three)")
    parser.add_argument("--trials", type=int, default=6, help="trials per sweep, all kept (default 6)")
    parser.add_argument("--train", type=int, default=2000, help="training examples (default 2000 of 67,349)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per input (default 64)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 4], metavar=("LOW", "HIGH"),
                        help="unfreeze_depth range (default 2 4 of 6 blocks)")
    parser.add_argument("--validation-fraction", type=float, default=0.02,
                        help="share of training sentences held out, with their phrases (default 0.02)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="seed trials of the first run's best (default 3; 0: none)")
    args = parser.parse_args()
    device = common.resolve_device(args.device, args.threads)
    env = dict(os.environ, SWEEPER_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="" if device == "cpu" else
               os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    env.pop("SWEEPER_STORAGE", None)
    test_size = len(common.read_sst2("validation"))
    print(f"machine {common.machine()}; {device}", flush=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sweeper-soup-bench-") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.runs):
            for head_init in args.head_init:
                folder = Path(tmp) / f"{head_init}-{seed}"
                folder.mkdir()
                run = one_run(args, seed, head_init, folder, env)
                runs.append(run)
                print(f"seed {seed} head_init {head_init}: best trial {run['best_trial']} val "
                      f"{run['best_validation']:.4f} test {run['best_test']:.4f} | greedy {run['greedy_members']} "
                      f"val {run['greedy_validation']:.4f} test {run['greedy_test']:.4f} | uniform val "
                      f"{run['uniform_validation']:.4f} test {run['uniform_test']:.4f} | sweep "
                      f"{run['sweep_seconds']:.0f}s", flush=True)
                if run["seeds"]:
                    s = run["seeds"]
                    print(f"  seeds of trial {s['trial']}: val {s['validation']['mean']:.4f} ± "
                          f"{s['validation']['std']:.4f}, test {s['test']['mean']:.4f} ± {s['test']['std']:.4f} "
                          f"(std over {s['test']['n']})", flush=True)
                common.finish(args, {"machine": common.machine(), "device": device, "settings": vars(args),
                                     "runs": runs, "summary": summary(runs, test_size)})
    rows = summary(runs, test_size)
    print()
    print(common.table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
