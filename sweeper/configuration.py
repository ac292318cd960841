"""The configuration a study carries: recorded once, when the study is created, and compared
whenever a machine launches it again or joins it, so that trials of one study are never
trained under two configurations (issue 17.5).

What is recorded is the study file's resolved settings with every password masked; it is held
as a study *system* attribute, for machines (Optuna's dashboard and ``optuna trials`` show user
attributes, and a person reads the configuration in the study file). Settings that say where a
machine keeps things, or how long the sweep may run, may differ between machines without
changing what a trial computes; every other setting must agree.
"""

from __future__ import annotations

import json
from typing import Any

import optuna

from sweeper import record
from sweeper.errors import SweepError
from sweeper.redact import mask
from sweeper.study import Sweep

# May differ between machines or launches: where things go, the budget (which the study carries
# itself), how many checkpoints a machine keeps, how often a cut-off trial is retried.
# array_size too: a bigger device holds a bigger array, and each member is an ordinary trial.
PER_MACHINE = ("storage", "artifacts", "output_dir", "n_trials", "timeout", "gpu_hours", "keep", "max_retries",
               "array_size")
SHOWN_DIFFERENCES = 5  # a refusal names this many differences, then counts the rest


def of(sweep: Sweep) -> dict[str, Any]:
    """The sweep's resolved configuration as plain JSON data, passwords masked."""
    return _masked(json.loads(json.dumps(sweep.to_dict(), default=str)))


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def differences(recorded: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """Every setting that trials compute with and that differs: ``"epochs: 6 in the study, 4
    here"``, nested settings by their dotted name (``model.layers``)."""
    theirs, ours = _flat(recorded), _flat(mine)
    lines = []
    for key in sorted(set(theirs) | set(ours)):
        if key.split(".")[0] in PER_MACHINE or theirs.get(key) == ours.get(key):
            continue
        lines.append(f"{key}: {_shown(theirs, key)} in the study, {_shown(ours, key)} here")
    return lines


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _shown(values: dict[str, Any], key: str) -> str:
    return json.dumps(values[key]) if key in values else "not set"


def record_or_check(study: optuna.Study, sweep: Sweep, source: str = "this machine's study file") -> None:
    """Record the sweep's configuration on a study that has none; on one that has, refuse a
    configuration that differs, with one line naming the differences."""
    mine = of(sweep)
    recorded = record.STUDY_CONFIG.get(study)
    if recorded is None:
        record.STUDY_CONFIG.set(study, mine)
        return
    found = differences(recorded, mine)
    if not found:
        return
    shown = "; ".join(found[:SHOWN_DIFFERENCES])
    more = f" (and {len(found) - SHOWN_DIFFERENCES} more)" if len(found) > SHOWN_DIFFERENCES else ""
    raise SweepError(
        f"the study {sweep.name!r} was created with other settings than {source} gives here: "
        f"{shown}{more}. Its trials must all train the same way: use the study file and --set values "
        "it was created with, or another `name` for a new sweep")
