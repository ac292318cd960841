"""``sweeper best``: hand out a trial's checkpoint as a folder the model's own loader opens.

It works while the sweep runs or after it, from any machine that reaches the storage and the
artifact store: the store is the study file's ``artifacts`` when it names one, else the one
recorded on the study at launch. Every file's SHA-256 is checked against the one recorded
when it was saved before anything is written to ``out``. Beside the checkpoint go
``params.json`` (the trial's hyperparameters) and ``metrics.json`` (its validation metrics,
and with ``--evaluate`` its held-out test metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper import checkpoints, finalize, record
from sweeper.errors import SweepError
from sweeper.study import Sweep


def choose(sweep: Sweep, study: optuna.Study, trial_number: int | None = None) -> FrozenTrial:
    """The best complete trial with a checkpoint, or trial ``trial_number``."""
    trials = study.get_trials(deepcopy=False)
    if trial_number is None:
        ranked = record.ranked(trials, study.direction)
        if not ranked:
            counts = {s: sum(t.state == s for t in trials) for s in TrialState}
            raise SweepError(
                f"the study {sweep.name!r} has no finished trial with a checkpoint yet "
                f"({counts[TrialState.COMPLETE]} complete, {counts[TrialState.RUNNING]} running, "
                f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed): wait for "
                "one to finish, or see `sweeper status` for why none did"
            )
        return ranked[0]
    matches = [t for t in trials if t.number == trial_number]
    if not matches:
        raise SweepError(f"the study {sweep.name!r} has no trial {trial_number} (it has "
                         f"{len(trials)}): pick a complete trial (`sweeper status` lists them)")
    if matches[0].state != TrialState.COMPLETE:
        raise SweepError(f"trial {trial_number} of {sweep.name!r} is {matches[0].state.name.lower()}, "
                         "not complete: pick a complete trial (`sweeper status` lists them)")
    return matches[0]


def export(sweep: Sweep, study: optuna.Study, out: Path, trial_number: int | None = None,
           evaluate: bool = False) -> str:
    """Write the checkpoint (verified), ``params.json`` and ``metrics.json`` into ``out``;
    return one line for the user."""
    trial = choose(sweep, study, trial_number)
    removed_by = checkpoints.deleted_by(study, trial.number)
    if removed_by is not None:
        gone = checkpoints.deleted(study)
        ranked = record.ranked(study.get_trials(deepcopy=False), study.direction)
        kept = [t.number for t in ranked if t.number not in gone]
        raise SweepError(f"the checkpoint of trial {trial.number} was removed by keep-top-"
                         f"{removed_by or 'k'}: pick one of the kept trials {kept} with --trial N")
    location = checkpoints.location_of(sweep, study)
    store = checkpoints.open_store(location, sweep.output_path, create=False)
    checkpoints.download_model(store, trial, out)
    metrics = {
        "trial": trial.number, "metric": sweep.metric, "direction": study.direction.name.lower(),
        "value": trial.value, "best_evaluation": record.BEST_EVALUATION.get(trial),
        "validation": record.VALIDATION.items(trial),
        "intermediate_values": trial.intermediate_values,
    }
    test = record.TEST.get(study, trial.number)
    if evaluate and test is None:  # the folder just handed out, so the figure is of exactly it
        test = finalize.evaluate_folder(sweep, out)
        finalize.record_test(study, trial.number, test, sweep.metric)
    if test is not None:
        metrics["test"] = test
    (out / "params.json").write_text(json.dumps(trial.params, indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    line = f"trial {trial.number}: validation {sweep.metric} {trial.value:.4f}"
    if test is not None:
        line += f", held-out test {sweep.metric} {test[sweep.metric]:.4f}"
    return f"{line}; written to {out}/"
