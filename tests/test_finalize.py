"""The end of a sweep: the held-out test figure recorded on the study, and a sweep where no
trial completed. The evaluation of a real checkpoint is tests/test_best.py's (``finished_sweep``)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from sweeper import finalize, record
from sweeper import study as study_file
from sweeper.storage import open_storage
from tests.helpers import TINY_STUDY, write_study

NO_BEST = "no trial completed, so there is no best trial: see `sweeper status` for the reasons"


def _study(url: str, direction: str = "maximize", name: str = "finalize") -> optuna.Study:
    storage = open_storage(url, heartbeat_interval=None, grace_period=None)
    return optuna.create_study(study_name=name, storage=storage, direction=record.direction_of(direction))


def _complete(value: float, checkpoint: bool = True) -> FrozenTrial:
    return optuna.create_trial(value=value, system_attrs={record.CHECKPOINT.key: {"files": {}}} if checkpoint else {})


def _with_trials(url: str, *values: float, direction: str = "maximize") -> optuna.Study:
    study = _study(url, direction)
    for value in values:
        study.add_trial(_complete(value))
    return study


# --------------------------------------------------------------------------- record_test


def test_a_test_figure_is_recorded_under_its_trial_number(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.7, 0.9, 0.8)
    finalize.record_test(study, 2, {"accuracy": 0.75, "loss": 0.5}, "accuracy")
    assert record.TEST.get(study, 2) == {"accuracy": 0.75, "loss": 0.5}
    assert study.user_attrs[record.TEST.key(2)] == {"accuracy": 0.75, "loss": 0.5}


def test_the_figure_of_a_trial_that_is_not_the_best_does_not_become_best_test(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.7, 0.9, 0.8)
    finalize.record_test(study, 2, {"accuracy": 0.75}, "accuracy")  # `sweeper best --trial 2 --evaluate`
    assert record.BEST_TEST.get(study) is None


def test_the_best_trials_figure_becomes_best_test_with_its_metric_and_every_score(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.7, 0.9, 0.8)
    scores = {"accuracy": 0.85, "f1": 0.8, "loss": 0.4}
    finalize.record_test(study, 1, scores, "f1")
    assert record.BEST_TEST.get(study) == {"trial": 1, "metric": "f1", "value": 0.8, "all": scores}


def test_a_higher_value_without_a_checkpoint_is_not_the_best(storage_url: str) -> None:
    study = _study(storage_url)
    study.add_trial(_complete(0.95, checkpoint=False))  # 0: nothing to evaluate or deploy
    study.add_trial(_complete(0.8))  # 1
    finalize.record_test(study, 0, {"accuracy": 0.9}, "accuracy")
    assert record.BEST_TEST.get(study) is None
    finalize.record_test(study, 1, {"accuracy": 0.78}, "accuracy")
    assert record.BEST_TEST.get(study)["trial"] == 1


def test_a_tie_goes_to_the_earlier_trial(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.9, 0.9)
    finalize.record_test(study, 1, {"accuracy": 0.88}, "accuracy")
    assert record.BEST_TEST.get(study) is None
    finalize.record_test(study, 0, {"accuracy": 0.87}, "accuracy")
    assert record.BEST_TEST.get(study)["trial"] == 0


def test_in_a_minimizing_study_the_lowest_value_is_the_best(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.3, 0.1, 0.2, direction="minimize")
    finalize.record_test(study, 0, {"loss": 0.35}, "loss")
    assert record.BEST_TEST.get(study) is None, "0.3 is the highest loss, not the best"
    finalize.record_test(study, 1, {"loss": 0.12}, "loss")
    assert record.BEST_TEST.get(study) == {"trial": 1, "metric": "loss", "value": 0.12, "all": {"loss": 0.12}}


def test_best_test_is_replaced_when_the_best_trials_figure_is_recorded_again(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.7, 0.9)
    finalize.record_test(study, 1, {"accuracy": 0.85}, "accuracy")
    finalize.record_test(study, 1, {"accuracy": 0.87}, "accuracy")  # evaluated again
    assert record.BEST_TEST.get(study)["value"] == 0.87
    assert record.TEST.get(study, 1) == {"accuracy": 0.87}


def test_best_test_is_kept_when_another_trials_figure_is_recorded(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.7, 0.9)
    finalize.record_test(study, 1, {"accuracy": 0.85}, "accuracy")
    finalize.record_test(study, 0, {"accuracy": 0.99}, "accuracy")  # a better test figure, but not the best trial
    assert record.BEST_TEST.get(study) == {"trial": 1, "metric": "accuracy", "value": 0.85, "all": {"accuracy": 0.85}}
    assert record.TEST.get(study, 0) == {"accuracy": 0.99}


def test_best_test_moves_to_a_new_best_trial_once_its_figure_is_recorded(storage_url: str) -> None:
    study = _with_trials(storage_url, 0.7, 0.9)
    finalize.record_test(study, 1, {"accuracy": 0.85}, "accuracy")
    study.add_trial(_complete(0.95))  # 2: finished after the first figure was recorded
    assert record.BEST_TEST.get(study)["trial"] == 1, "until trial 2's figure is recorded"
    finalize.record_test(study, 2, {"accuracy": 0.9}, "accuracy")
    assert record.BEST_TEST.get(study)["trial"] == 2
    assert record.TEST.get(study, 1) == {"accuracy": 0.85}, "the earlier figure stays under its trial"


# --------------------------------------------------------------------------- finish


@pytest.mark.parametrize("states", [(), (TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL)],
                         ids=["no-trials", "failed-and-pruned"])
def test_finish_says_there_is_no_best_trial_when_none_completed(states: tuple[TrialState, ...],
                                                                 tmp_path: Path) -> None:
    sweep = study_file.load(write_study(tmp_path, TINY_STUDY))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _study(url, sweep.direction, sweep.name)
    for state in states:
        study.add_trial(optuna.create_trial(state=state, intermediate_values={0: 0.5}))
    said: list[str] = []
    finalize.finish(sweep, url, say=said.append)
    assert said == [NO_BEST]
    assert record.BEST_TEST.get(study) is None
    assert record.TEST.items(study) == {}
