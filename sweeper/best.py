"""``sweeper best``: hand out a trial's checkpoint as a folder the model's own loader opens.

It works while the sweep runs or after it, from any machine that reaches the storage and the
artifact store: the store is the study file's ``artifacts`` when it names one, else the one
recorded on the study at launch. Every file's SHA-256 is checked against the one recorded
when it was saved before anything is written to ``out``. Beside the checkpoint go
``params.json`` (the trial's hyperparameters) and ``metrics.json`` (its validation metrics,
and with ``--evaluate`` its held-out test metrics). For a ``scheduler="pbt"`` sweep, also
``schedule.json``: the segments its weights went through, oldest first, with each one's
hyperparameters, steps and decision (``lineage.py``).

``--soup`` writes instead the weight soup of the kept trials (``soup.py``), with ``soup.json``.
``--seeds N`` first trains the chosen configuration again with N other seeds, as ordinary
budgeted trials marked ``repeats`` (the workers run them as they run any ticket), and reports
the mean and spread of their validation and test figures. Seed trials are measurements, not
candidates: ``record.ranked`` leaves them out, so they are never "the best trial", never a soup
member, and keep-top-k never removes their checkpoints (there are only N of them).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from sweeper import __version__, budget, checkpoints, finalize, lineage, optuna_adapter, record, soup
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
    if evaluate and sweep.train is not None:
        raise SweepError(f"the study {sweep.name!r} trains with its own `train` function: its held-out test is "
                         "the function's to score (leave out --evaluate)")
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
    stored = test is not None  # scored before, on these same files (their SHA-256 was checked)
    if evaluate and test is None:  # the folder just handed out, so the figure is of exactly it
        test = finalize.evaluate_folder(sweep, out)
        finalize.record_test(study, trial.number, test, sweep.metric)
    if test is not None:
        metrics["test"] = test
    (out / "params.json").write_text(json.dumps(trial.params, indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    schedule = lineage.schedule(study.get_trials(deepcopy=False), trial) if lineage.segment(trial) else []
    if schedule:
        (out / "schedule.json").write_text(json.dumps(schedule, indent=1, default=str))
    line = f"trial {trial.number}: validation {sweep.metric} {trial.value:.4f}"
    if test is not None:
        line += f", held-out test {sweep.metric} {test[sweep.metric]:.4f}"
        if evaluate and stored:  # --evaluate asked for a score: say it was not computed again
            line += " (recorded on the study when it was first scored; not scored again)"
    if schedule:
        line += f"; its schedule of {len(schedule)} segments in schedule.json"
    return f"{line}; written to {out}/"


# --------------------------------------------------------------------------- soups


def kept_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The complete trials whose checkpoint keep-top-k kept, best first (seed trials are not
    ranked: ``record.ranked``)."""
    gone = checkpoints.deleted(study)
    return [t for t in record.ranked(study.get_trials(deepcopy=False), study.direction) if t.number not in gone]


def export_soup(sweep: Sweep, study: optuna.Study, out: Path, method: str, evaluate: bool = False) -> str:
    """Write the ``method`` soup of the kept trials into ``out`` (loadable as a checkpoint of
    one trial is) with ``soup.json``; record its figures on the study; return one line."""
    from sweeper.finetune.loop import evaluate as evaluate_split
    from sweeper.objective import prepare_data

    if sweep.train is not None:
        raise SweepError(f"the study {sweep.name!r} trains with its own `train` function, whose models sweeper "
                         "cannot load or score: --soup averages the models sweeper's own loop trains")
    kept = kept_trials(study)
    best = choose(sweep, study)  # the same refusal as `best` when nothing has finished
    store = checkpoints.open_store(checkpoints.location_of(sweep, study), sweep.output_path, create=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data, tokenizer = prepare_data(sweep)
    ingredients, vessel = _ingredients(sweep, store, kept, device)

    def score(state: soup.State) -> dict[str, float]:  # as trials are scored: the study's validation split
        vessel.model.load_state_dict(state)
        return evaluate_split(vessel, data.validation, device, sweep.bf16, data.num_labels)

    blend: soup.Blend = soup.average
    if vessel.kind == "image":
        blend = soup.batchnorm_blend(vessel, soup.training_batches(data.train, device, sweep.seed))
    made = soup.make(method, ingredients, score, sweep.metric, study.direction, blend)
    vessel.model.load_state_dict(made.state)
    out.mkdir(parents=True, exist_ok=True)
    vessel.save(out, tokenizer)
    figures: dict[str, Any] = {
        "method": made.method, "metric": sweep.metric, "direction": study.direction.name.lower(),
        "members": made.members, "weights": made.weights, "validation": made.validation[sweep.metric],
        "best_trial": best.number, "best_validation": best.value,
    }
    if evaluate:  # the folder just written, so the figure is of exactly it; the best trial's beside it
        figures["test"] = finalize.evaluate_folder(sweep, out, device)[sweep.metric]
        figures["best_test"] = _test_of(sweep, study, store, best, device)[sweep.metric]
    _write_soup_json(out, made, figures, {t.number: t for t in kept})
    record.SOUP.set(study, made.method, figures)
    return _soup_line(sweep, figures, len(kept), out)


def _ingredients(sweep: Sweep, store: Any, kept: list[FrozenTrial],
                 device: torch.device) -> tuple[list[soup.Ingredient], Any]:
    """The kept trials' weights (every file's SHA-256 checked as `best` checks it), and the
    first trial's model on ``device``: the vessel every soup is loaded into and scored with."""
    from sweeper.finetune.models import from_checkpoint

    ingredients, vessel = [], None
    with tempfile.TemporaryDirectory(prefix="sweeper-soup-") as tmp:
        for trial in kept:
            adapter = from_checkpoint(checkpoints.download_model(store, trial, Path(tmp) / str(trial.number)))
            # Copies: loading a soup into the vessel must not overwrite the first trial's weights.
            weights = {name: t.detach().cpu().clone() for name, t in adapter.model.state_dict().items()}
            ingredients.append(soup.Ingredient(trial.number, float(trial.value or 0.0), weights))  # ranked: has one
            vessel = vessel or adapter.to(device)
    if vessel is None:  # keep-top-k never removes the best, so only a store emptied by hand gets here
        raise SweepError(f"the study {sweep.name!r} has no kept checkpoint to make a soup of: see `sweeper status`")
    return ingredients, vessel


def _test_of(sweep: Sweep, study: optuna.Study, store: Any, trial: FrozenTrial,
             device: torch.device | None = None) -> dict[str, float]:
    """The held-out test figures of ``trial``: as recorded, or scored now (once) and recorded."""
    scores = record.TEST.get(study, trial.number)
    if scores is None:
        scores = finalize.evaluate_on_test(sweep, store, trial, device)
        finalize.record_test(study, trial.number, scores, sweep.metric)
    return dict(scores)


def _write_soup_json(out: Path, made: soup.Soup, figures: dict[str, Any], trials: dict[int, FrozenTrial]) -> None:
    members = [{"trial": n, "weight": w, "validation": trials[n].value,
                "sha256": {name: f["sha256"] for name, f in record.CHECKPOINT.get(trials[n])["files"].items()}}
               for n, w in zip(made.members, made.weights)]
    manifest = {**figures, "members": members, "validation_metrics": made.validation,
                "steps": [s.as_dict() for s in made.steps], "sweeper": __version__}
    (out / "soup.json").write_text(json.dumps(manifest, indent=1))


def _soup_line(sweep: Sweep, f: dict[str, Any], kept: int, out: Path) -> str:
    line = (f"{f['method']} soup of trials {f['members']} ({len(f['members'])} of {kept} kept): validation "
            f"{sweep.metric} {f['validation']:.4f} (best trial {f['best_trial']}: {f['best_validation']:.4f})")
    if "test" in f:
        line += f", held-out test {sweep.metric} {f['test']:.4f} (best trial: {f['best_test']:.4f})"
    return f"{line}; written to {out}/"


# --------------------------------------------------------------------------- seed trials


def repeat_seed(study_seed: int, trial_number: int, index: int) -> int:
    """The seed of the ``index``-th repeat of ``trial_number``: none of the sweep's own."""
    digest = hashlib.sha256(f"{study_seed}:{trial_number}:repeat:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_trials(study: optuna.Study, trial_number: int) -> list[FrozenTrial]:
    """The trials that repeat ``trial_number`` with another seed (retries of them included)."""
    return [t for t in study.get_trials(deepcopy=False)
            if (record.REPEAT.get(t) or {}).get("trial") == trial_number]


def queue_seeds(sweep: Sweep, study: optuna.Study, seeds: int, trial_number: int | None = None) -> tuple[FrozenTrial, int]:
    """Queue ``seeds`` repeats of the best trial (or ``trial_number``) as budgeted tickets with
    its parameters fixed; return the trial and the study's new budget.

    Each repeat is queued once per study, so running this again adds only what is missing.
    """
    if seeds < 2:
        raise SweepError(f"`--seeds` is {seeds}: a spread needs 2 or more seeds, e.g. --seeds 3")
    if sweep.train is not None:
        raise SweepError(f"the study {sweep.name!r} trains with its own `train` function: --seeds repeats "
                         "trials of sweeper's own loop only (give your function's seeds a loop of its own)")
    original = choose(sweep, study, trial_number)
    if record.REPEAT.get(original):
        raise SweepError(f"trial {original.number} is itself a seed trial of trial "
                         f"{record.REPEAT.get(original)['trial']}: repeat that one (--trial "
                         f"{record.REPEAT.get(original)['trial']})")

    def add_missing() -> None:
        # Counted and added under the study's ticket lock, as creators add tickets (issue 17.4).
        with budget.ticket_lock(study) as still_held:
            queued = {int(record.REPEAT.get(t)["index"]) for t in seed_trials(study, original.number)}
            for index in range(seeds):
                if index not in queued:
                    still_held()
                    mark = {"trial": original.number, "seed": repeat_seed(sweep.seed, original.number, index),
                            "index": index}
                    study.enqueue_trial(original.params, user_attrs={record.REPEAT.key: mark})

    # Adding trials is not repeated by the storage; counting first makes the whole safe to repeat.
    optuna_adapter.call_with_retries(add_missing, what="queueing seed trials")
    spent = budget.tally(study.get_trials(deepcopy=False)).spent
    total = max(spent, int(record.N_TRIALS.get(study) or 0))
    record.N_TRIALS.set(study, total)  # the repeats are tickets of the budget, which grows by them
    return original, total


def _spread(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if n >= 2 else None
    return {"n": n, "mean": mean, "std": std, "stderr": std / math.sqrt(n) if std is not None else None,
            "values": values}


def seed_figures(sweep: Sweep, study: optuna.Study, original: FrozenTrial) -> dict[str, Any]:
    """Score every finished repeat of ``original`` on the held-out test split (once each) and
    record the mean and spread of validation and test beside the original's figures."""
    store = checkpoints.open_store(checkpoints.location_of(sweep, study), sweep.output_path, create=False)
    done = [t for t in seed_trials(study, original.number) if t.state == TrialState.COMPLETE
            and record.CHECKPOINT.get(t)]
    tests = [float(_test_of(sweep, study, store, trial)[sweep.metric]) for trial in done]
    original_test = record.TEST.get(study, original.number)
    figures = {
        "trial": original.number, "metric": sweep.metric, "seed_trials": [t.number for t in done],
        "seeds": [record.REPEAT.get(t)["seed"] for t in done],
        "validation": _spread([float(t.value) for t in done if t.value is not None]), "test": _spread(tests),
        "original": {"validation": original.value,
                     "test": original_test[sweep.metric] if original_test else None},
    }
    record.SEEDS.set(study, original.number, figures)
    return figures


def seeds_line(sweep: Sweep, f: dict[str, Any]) -> str:
    def shown(s: dict[str, Any]) -> str:
        if s["mean"] is None:
            return "-"
        return f"{s['mean']:.4f} ± {s['std']:.4f} (std; stderr {s['stderr']:.4f})" if s["std"] is not None \
            else f"{s['mean']:.4f}"
    o = f["original"]
    original_test = f"{o['test']:.4f}" if o["test"] is not None else "-"
    return (f"trial {f['trial']} with {f['validation']['n']} other seeds (trials {f['seed_trials']}): validation "
            f"{sweep.metric} {shown(f['validation'])}, held-out test {shown(f['test'])}; the trial itself: "
            f"validation {o['validation']:.4f}, test {original_test}")
