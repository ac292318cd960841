"""The trial and study record: one definition, true to the code that writes and reads it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from sweeper import record
from tests.helpers import ROOT

FIELD_NAMES = {id(value): name for name, value in vars(record).items()
               if isinstance(value, record.Field | record.Family)}


def _modules_using(name: str) -> set[str]:
    return {path.stem for path in (ROOT / "sweeper").rglob("*.py")
            if path.name != "record.py" and re.search(rf"record\.{name}\b", path.read_text())}


def test_docs_records_md_is_the_table_of_the_record() -> None:
    assert record.table() in (ROOT / "docs" / "records.md").read_text(), \
        "docs/records.md is out of date: write record.table() into it"


def test_each_field_names_exactly_the_modules_that_write_and_read_it() -> None:
    for field in record.FIELDS:
        name = FIELD_NAMES[id(field)]
        writers = {word.split(" ")[0] for word in field.writer.split(", ")}
        assert _modules_using(name) == writers | set(field.readers), name


def test_no_module_names_an_attribute_key_of_its_own() -> None:
    literal = re.compile(r"""(set_user_attr|user_attrs\.get|user_attrs\[|system_attrs\.get)\(?\s*["']""")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "sweeper").rglob("*.py") if p.name != "record.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []


def test_keys_are_unique_within_their_scope() -> None:
    keys = [(f.scope, f.key if isinstance(f, record.Field) else f.prefix) for f in record.FIELDS]
    assert len(keys) == len(set(keys))


def test_ranking_puts_the_best_first_ties_to_the_earlier_and_needs_a_checkpoint_unless_told() -> None:
    study = optuna.create_study(direction="maximize")
    for value, checkpoint in [(0.5, True), (0.9, False), (0.7, True), (0.7, True)]:
        attrs = {record.CHECKPOINT.key: {"files": {}}} if checkpoint else {}
        study.add_trial(optuna.create_trial(value=value, system_attrs=attrs))
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, intermediate_values={1: 1.0}))
    trials = study.get_trials()
    assert [t.number for t in record.ranked(trials, StudyDirection.MAXIMIZE)] == [2, 3, 0]
    assert [t.number for t in record.ranked(trials, StudyDirection.MINIMIZE)] == [0, 2, 3]
    assert record.best(trials, StudyDirection.MAXIMIZE).number == 1  # type: ignore[union-attr]
    assert record.best([], StudyDirection.MAXIMIZE) is None


def test_better_is_strict_and_follows_the_direction() -> None:
    assert record.better(0.6, 0.5, record.direction_of("maximize"))
    assert not record.better(0.5, 0.5, record.direction_of("maximize")), "a tie keeps the incumbent"
    assert record.better(0.4, 0.5, record.direction_of("minimize"))
    assert record.better(0.4, None, StudyDirection.MINIMIZE)


def test_fields_read_and_write_trials_and_studies() -> None:
    study = optuna.create_study()
    trial = study.ask()
    record.VALIDATION.set(trial, "accuracy", 0.8)
    record.FAIL_REASON.set(trial, "a reason")
    record.TEST.set(study, 3, {"accuracy": 0.7})
    frozen = study.tell(trial, 1.0)
    assert record.VALIDATION.items(frozen) == {"accuracy": 0.8}
    assert (record.FAIL_REASON.get(frozen), record.WORKER.get(frozen, -1)) == ("a reason", -1)
    assert record.TEST.get(study, 3) == {"accuracy": 0.7} and record.TEST.key(3) == "test:3"


def test_what_a_person_reads_on_a_trial_is_short_and_the_configuration_is_on_the_study_once(
        finished_sweep: dict[str, Any]) -> None:
    """Issue 18.9: every trial carried the whole configuration and every checkpoint hash as user
    attributes (2,340 characters a trial, an `optuna trials` table 2,556 wide). Now the study
    holds the configuration once, and what only machines read is in system attributes."""
    storage = optuna.storages.RDBStorage(str(finished_sweep["url"]))
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.get_trials()
    assert trials and all(t.state.is_finished() for t in trials)
    for trial in trials:
        assert len(json.dumps(trial.user_attrs)) < 400, trial.user_attrs
        assert all(len(json.dumps(value)) < 80 for value in trial.user_attrs.values()), trial.user_attrs
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(record.CHECKPOINT.get(t)["files"] for t in complete if t.number in {r.number for r in record.ranked(
        trials, study.direction)})
    assert record.STUDY_CONFIG.get(study)["name"] == "tiny" and not study.user_attrs.get("config")
    table = subprocess.run([str(Path(sys.executable).with_name("optuna")), "trials", "--study-name", "tiny", "--storage",
                            str(finished_sweep["url"])], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) < 700, table.stdout
