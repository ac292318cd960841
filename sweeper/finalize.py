"""The end of a sweep: keep-top-k, and the held-out test figure of the best trial.

Honest selection: trials are compared on the validation split carved out of the training
data; the data set's own held-out split is evaluated here, once, for the best trial only.
The figure is recorded on the study (user attributes ``test:<trial>`` and ``best_test``),
since a finished trial cannot be changed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from sweeper import checkpoints, record, space
from sweeper.errors import SweepError
from sweeper.storage import open_storage
from sweeper.study import Sweep

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

def evaluate_on_test(sweep: Sweep, store: Any, trial: optuna.trial.FrozenTrial,
                     device: torch.device | None = None) -> dict[str, float]:
    """Every metric of ``trial``'s checkpoint on the held-out test split."""
    with tempfile.TemporaryDirectory(prefix="sweeper-best-") as tmp:
        folder = checkpoints.download_model(store, trial, Path(tmp))
        return evaluate_folder(sweep, folder, device)


def evaluate_folder(sweep: Sweep, folder: Path, device: torch.device | None = None) -> dict[str, float]:
    """Every metric of the checkpoint in ``folder`` on the study's held-out test split."""
    import torch  # here: the launcher needs PyTorch only for this last evaluation

    from sweeper.finetune.data import prepare
    from sweeper.finetune.loop import evaluate
    from sweeper.finetune.models import from_checkpoint

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = sweep.model.tokenizer(sweep.cache_dir)
    data = prepare(sweep.data, sweep.cache_dir, sweep.seed, tokenizer, sweep.model.identity())
    adapter = from_checkpoint(folder).to(device)
    return evaluate(adapter, data.test, device, sweep.bf16, data.num_labels)


def record_test(study: optuna.Study, trial_number: int, scores: dict[str, float], metric: str) -> None:
    """Record the test figure of ``trial_number``; it becomes the study's ``best_test`` only
    when that trial is the study's best (``sweeper best --trial N`` may score another)."""
    record.TEST.set(study, trial_number, scores)
    ranked = record.ranked(study.get_trials(deepcopy=False), study.direction)
    if not ranked or ranked[0].number != trial_number:
        return
    record.BEST_TEST.set(study, {"trial": trial_number, "metric": metric, "value": scores[metric], "all": scores})


def finish(sweep: Sweep, url: str, say: Callable[[str], None] = logger.info) -> None:
    # The sweep has just run on this storage: a server that is restarting is waited for.
    storage = open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False,
                           wait_for_server=True)
    try:
        _finish(sweep, optuna.load_study(study_name=sweep.name, storage=storage), say)
    finally:
        storage.dispose()  # every way out gives the connections back


def _finish(sweep: Sweep, study: optuna.Study, say: Callable[[str], None]) -> None:
    store = checkpoints.open_store(checkpoints.location_of(sweep, study), sweep.output_path)
    checkpoints.keep_top_k(study, store, sweep.keep)
    checkpoints.remove_stale_resumes(study, store)
    ranked = record.ranked(study.get_trials(deepcopy=False), study.direction)
    if not ranked:
        say("no trial completed, so there is no best trial: see `sweeper status` for the reasons")
        return
    best = ranked[0]
    if sweep.train is not None:  # the function's model and test data are its own: sweeper cannot score them
        say(f"best trial {best.number}: validation {sweep.metric} {best.value:.4f}; params "
            f"{_resolved_params(sweep, best)} (a `train` study's held-out test is the function's to score)")
        return
    scores = record.TEST.get(study, best.number)
    if scores is None:
        # Scoring can take a minute on a CPU (BERT on SST-2's 872 sentences): say what this wait is.
        say(f"scoring the best trial, {best.number}, on the held-out test split (once, for it alone)")
        try:
            scores = evaluate_on_test(sweep, store, best)
        except SweepError as exc:
            say(f"could not evaluate the best trial on the test split: {exc}")
            return
        record_test(study, best.number, scores, sweep.metric)
    say(f"best trial {best.number}: validation {sweep.metric} {best.value:.4f}, "
        f"held-out test {sweep.metric} {scores[sweep.metric]:.4f}; params {_resolved_params(sweep, best)}")


def _resolved_params(sweep: Sweep, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The trial's values in the space's order, constants too: Optuna records searched ones only."""
    return {name: trial.params.get(name, value) for name, value in sweep.space.items()
            if name in trial.params or not space.is_distribution(value)}
