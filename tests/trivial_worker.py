"""A worker process with a trivial objective: the worker machinery alone, without PyTorch.

    python -m tests.trivial_worker URL STUDY INDEX [SECONDS_PER_TRIAL]
"""

from __future__ import annotations

import sys
import threading
import time

import optuna
from optuna.trial import TrialState

from sweeper import storage, worker


def main(url: str, study_name: str, index: int, seconds: float) -> int:
    retry = worker.RetryCallback(max_retries=3)
    opened = storage.open_storage(url, heartbeat_interval=1, grace_period=4, stale_trial_callback=retry,
                                  create_tables=False)
    study = optuna.load_study(study_name=study_name, storage=opened,
                              sampler=optuna.samplers.RandomSampler(seed=index))

    def run_trial(trial: optuna.Trial) -> worker.Outcome:
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(3):
            trial.report(x * step, step)
        time.sleep(seconds)
        return worker.Outcome(TrialState.COMPLETE, value=x)

    return worker.serve(study, run_trial, retry, threading.Event(), heartbeat_interval=1, grace_period=4,
                        name=f"trivial worker {index}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0))
