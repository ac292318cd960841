"""What trial arrays do to the search (issue 21): shared structure against independent proposals.

    python bench/array_search.py                      # quickstart, 12 trials, study seeds 0,1,2
    python bench/array_search.py --seeds 0,1 --set epochs=2 --set n_trials=8   # a short run

In an array the members share the unfreeze depth and batch size of its first member, which
``sweeper/array_structure.py`` fixes to an untried structure while there is one (then the
sampler draws it); a sweep with ``array_size=1`` proposes every trial whole. Both
run the same study (``studies/quickstart.py`` by default) with the same budget, one worker,
for each study seed, through the real ``sweeper launch``. Figures per run: the best trial's
validation value and its held-out test figure (``sweeper launch`` scores the best trial once),
the distinct structures tried, the wall time and, for arrays, how full they stayed (members per
array-step over the array's size, from the workers' logs); then the mean difference, array
minus alone, with its standard error over the seeds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common


def sweep(study: str, array_size: int, seed: int, sets: list[str], folder: Path) -> dict[str, Any]:
    import optuna

    from sweeper import record

    url = f"sqlite:///{folder / 'study.db'}"
    args = [sys.executable, "-m", "sweeper", "launch", study, "--workers", "1", "--storage", url,
            "--array-size", str(array_size), "--set", f"seed={seed}", "--set", f"output_dir={folder}"]
    for item in sets:
        args += ["--set", item]
    started = time.time()
    done = subprocess.run(args, cwd=common.ROOT, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"array_search: the sweep failed: {done.stderr[-2000:]}")
    loaded = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    trials = [t for t in loaded.trials if t.value is not None]
    best = loaded.best_trial
    test = record.BEST_TEST.get(loaded) or {}
    structures = {(t.params.get("unfreeze_depth"), t.params.get("batch_size")) for t in trials}
    return {"array_size": array_size, "seed": seed, "best_validation": best.value, "best_test": test.get("value"),
            "structures": len(structures), "wall_s": round(wall, 1), "trials": len(trials),
            "fullness": _fullness(folder) if array_size > 1 else None}


def _fullness(folder: Path) -> float | None:
    """Members per array-step over the capacity, over every array of the sweep, from the
    workers' logs ("the array of trial N ended: S steps, M members a step on average, of K")."""
    pattern = re.compile(r"the array of trial \d+ ended: (\d+) steps, ([\d.]+) members a step on average, of (\d+)")
    steps = members = capacity = 0.0
    for log in folder.rglob("worker-*.log"):
        for found in pattern.finditer(log.read_text(errors="replace")):
            n, mean, k = int(found[1]), float(found[2]), int(found[3])
            steps, members, capacity = steps + n, members + n * mean, capacity + n * k
    return round(members / capacity, 3) if capacity else None


def _standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/quickstart.py")
    parser.add_argument("--array-size", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for size in (1, args.array_size):
            with tempfile.TemporaryDirectory(prefix="array-search-") as tmp:
                row = sweep(args.study, size, seed, args.set, Path(tmp))
            rows.append(row)
            full = f", arrays {row['fullness']:.0%} full" if row["fullness"] is not None else ""
            print(f"seed {seed} array_size {size}: best validation {row['best_validation']:.4f}, test "
                  f"{row['best_test']}, {row['structures']} structures, {row['wall_s']} s{full}", flush=True)
    gaps = {key: [a[key] - b[key] for a, b in zip(rows[1::2], rows[0::2]) if a[key] is not None and b[key] is not None]
            for key in ("best_validation", "best_test", "wall_s")}
    summary = {key: {"mean": statistics.mean(v), "standard_error": _standard_error(v), "runs": v}
               for key, v in gaps.items() if v}
    for key, value in summary.items():
        print(f"array minus alone, {key}: mean {value['mean']:+.4f} (standard error {value['standard_error']:.4f}) "
              f"over {len(value['runs'])} seeds {value['runs']}")
    common.finish(args, {"machine": common.machine(), "rows": rows, "array_minus_alone": summary})


if __name__ == "__main__":
    main()
