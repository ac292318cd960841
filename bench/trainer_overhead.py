"""What sweeper adds to one trial of a user's own `Trainer` script (issue 20).

    python bench/trainer_overhead.py

Runs `studies/trainer_sst2.py` twice with the same values and seed: once alone (`python
studies/trainer_sst2.py LR SEED`, the plain Trainer script), once as the one trial of a sweep
(`sweeper launch ... --workers 1 --set n_trials=1`, its learning rate fixed), and prints both
wall times (process start to exit, imports included, on this machine), their difference (the
overhead per trial: the launcher, the worker start, the study in SQLite, the callback's reports,
the resume states and the checkpoint upload), and the validation accuracy at each evaluation in
both (equal: the callback does not change what the Trainer computes).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time

import common

STUDY = common.ROOT / "studies" / "trainer_sst2.py"
LEARNING_RATE, WEIGHT_DECAY = 2e-4, 0.01


def main() -> None:
    from sweeper.objective import trial_seed

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE, help=f"default {LEARNING_RATE}")
    args = parser.parse_args()
    learning_rate = args.learning_rate

    seed = trial_seed(0, 0)  # what the sweep's trial 0 gets from the study seed 0
    started = time.time()
    alone = subprocess.run([sys.executable, str(STUDY), str(learning_rate), str(seed)], capture_output=True,
                           text=True, cwd=common.ROOT)
    alone_s = time.time() - started
    if alone.returncode != 0:
        raise SystemExit(f"the Trainer alone failed:\n{alone.stderr[-3000:]}")
    match = re.search(r"at each evaluation \[([^\]]*)\]", alone.stdout)
    alone_values = [float(v) for v in match[1].split(",")] if match else []

    with tempfile.TemporaryDirectory() as folder:
        started = time.time()
        swept = subprocess.run(
            [sys.executable, "-m", "sweeper", "launch", str(STUDY), "--workers", "1", "--set", "n_trials=1",
             "--set", f"space.learning_rate={learning_rate}", "--set", f"space.weight_decay={WEIGHT_DECAY}",
             "--set", f"output_dir={folder}/out"], capture_output=True, text=True, cwd=common.ROOT)
        swept_s = time.time() - started
        if swept.returncode != 0:
            raise SystemExit(f"the sweep failed:\n{swept.stderr[-3000:]}")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        [trial] = optuna.load_study(study_name="trainer-sst2", storage=f"sqlite:///{folder}/out/study.db").trials
        swept_values = [round(v, 6) for _, v in sorted(trial.intermediate_values.items())]

    print(f"the Trainer alone:         {alone_s:7.1f} s  validation accuracy {alone_values}")
    print(f"as a sweeper trial:        {swept_s:7.1f} s  validation accuracy {swept_values} (seed {seed})")
    print(f"overhead per trial:        {swept_s - alone_s:7.1f} s  ({swept_s / alone_s:.2f}x the Trainer alone)")
    print(f"same evaluations:          {alone_values == swept_values}")
    common.finish(args, {"machine": common.machine(), "alone_s": alone_s, "swept_s": swept_s,
                         "overhead_s": swept_s - alone_s, "alone": alone_values, "swept": swept_values})


if __name__ == "__main__":
    main()
