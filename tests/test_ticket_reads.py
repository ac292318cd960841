"""A worker's storage reads unclaimed tickets lightly, and sees exactly what a plain one sees.

``optuna_adapter.read_tickets_lightly`` (issue 7) builds bare tickets itself instead of loading them
at every read; these tests check that a study read through it is, after every change a sweep
makes, the same list of trials as the one Optuna's own reads give.
"""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from sweeper import budget, optuna_adapter
from sweeper.storage import open_storage
from sweeper.worker import RetryCallback, claim


def _view(url: str, light: bool) -> optuna.Study:
    storage = open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
    if light:
        optuna_adapter.read_tickets_lightly(storage)
    return optuna.load_study(study_name="tickets", storage=storage)


def _records(study: optuna.Study) -> list[tuple]:  # type: ignore[type-arg]
    return [(t._trial_id, t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs,
             t.intermediate_values, t.datetime_start, t.datetime_complete)
            for t in study.get_trials(deepcopy=False)]


def test_a_light_reader_sees_what_a_plain_reader_sees(storage_url: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    driver = optuna.create_study(study_name="tickets", storage=open_storage(storage_url, heartbeat_interval=None,
                                                                             grace_period=None))
    plain, light = _view(storage_url, False), _view(storage_url, True)

    def same() -> None:
        assert _records(light) == _records(plain)

    same()  # an empty study
    budget.ensure_tickets(driver, 8)
    same()
    finished = []
    for k in range(5):
        trial = claim(driver)
        assert trial is not None
        same()
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.report(x, 0)
        trial.set_user_attr("worker", k)
        same()
        if k == 2:  # cut off: failed, and a retry with its parameters waits
            driver.tell(trial, state=TrialState.FAIL)
            RetryCallback(3)(driver, driver._storage.get_trial(trial._trial_id))
        elif k == 3:
            continue  # still running
        else:
            driver.tell(trial, x)
            finished.append(trial.number)
        same()
    budget.ensure_tickets(driver, 12)  # the budget raised: new tickets above finished trials
    same()
    taken = claim(light)  # the light reader's own claims work as before
    assert taken is not None and taken.number == 5  # the lowest waiting trial
    same()
    while (trial := claim(driver)) is not None:  # the rest, the retry among them
        driver.tell(trial, 0.5)
        same()
    retried = [t for t in light.get_trials(deepcopy=False) if t.system_attrs.get("retry_history")]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and "x" in retried[0].params
    assert [t.state for t in light.get_trials(deepcopy=False)].count(TrialState.WAITING) == 0


def test_trials_created_elsewhere_appear_in_the_light_view(storage_url: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    driver = optuna.create_study(study_name="tickets", storage=open_storage(storage_url, heartbeat_interval=None,
                                                                             grace_period=None))
    budget.ensure_tickets(driver, 3)
    light, plain = _view(storage_url, True), _view(storage_url, False)
    _records(light)
    driver.add_trial(optuna.create_trial(state=TrialState.WAITING, params={"x": 0.3},
                                         distributions={"x": FloatDistribution(0.0, 1.0)},
                                         system_attrs={"retry_history": [0]}))
    driver.enqueue_trial({"x": 0.7})  # a waiting trial with fixed parameters is not a bare ticket
    assert _records(light) == _records(plain)
    for _ in range(4):
        trial = claim(driver)
        assert trial is not None
        driver.tell(trial, 1.0)
    assert _records(light) == _records(plain)
    assert [t.state for t in light.get_trials(deepcopy=False)].count(TrialState.WAITING) == 1
