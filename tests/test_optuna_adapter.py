"""What sweeper relies on inside Optuna, said once: these fail when an Optuna upgrade changes it.

``sweeper/optuna_adapter.py`` is the only module that reaches into Optuna's private names, and
every storage sweeper opens repeats its safe calls there. An upgrade of Optuna means reading
that module and making these tests pass again.
"""

from __future__ import annotations

import inspect
import re
import threading
import time

import optuna
import pytest
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from sweeper import budget, liveness, optuna_adapter
from sweeper.storage import open_storage
from sweeper.worker import RetryCallback, claim
from tests.helpers import ROOT

PRIVATE_OPTUNA = re.compile(
    r"\._storage\b|\._study_id\b|\._trial_id\b|\._thread_local\b|\._backend\b|"
    r"optuna[\w.]*\._\w+|from optuna[\w.]*\._|_tell_with_warning|_create_scoped_session|"
    r"_build_frozen_trial|_get_trials\b|_get_stale_trial_ids")


def _study(url: str, heartbeat: int | None = None, grace: int | None = None) -> optuna.Study:
    storage = open_storage(url, heartbeat_interval=heartbeat, grace_period=grace,
                           stale_trial_callback=RetryCallback(3) if heartbeat else None)
    return optuna.create_study(study_name="contract", storage=storage, direction="maximize", load_if_exists=True)


# --------------------------------------------------------------------------- one door


def test_no_module_but_the_adapter_reaches_into_optuna() -> None:
    offenders = []
    for path in sorted((ROOT / "sweeper").rglob("*.py")):
        if path.name == "optuna_adapter.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_OPTUNA.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "private Optuna names outside sweeper/optuna_adapter.py:\n" + "\n".join(offenders)


def test_no_storage_call_is_retried_at_its_call_site() -> None:
    sites = [f"{p.relative_to(ROOT)}" for p in (ROOT / "sweeper").rglob("*.py")
             if p.name != "optuna_adapter.py" and "retrying(" in p.read_text()]
    assert sites == []


def test_every_storage_call_is_retried_or_passed_through_for_a_stated_reason() -> None:
    """If Optuna adds a storage method, this says where it must be listed."""
    from optuna.storages._heartbeat import BaseHeartbeat

    methods = {name for base in (BaseStorage, BaseHeartbeat) for name, member in vars(base).items()
               if inspect.isfunction(member) and not name.startswith("__")} - {"get_failed_trial_callback"}
    listed = set(optuna_adapter.RETRIED) | set(optuna_adapter.NOT_RETRIED)
    assert methods - listed == set(), "unlisted storage methods"
    assert set(optuna_adapter.RETRIED) & set(optuna_adapter.NOT_RETRIED) == set()
    assert all(optuna_adapter.NOT_RETRIED.values()), "every call left out says why"
    # Implemented by the wrapper itself: a method inherited from BaseStorage would reach the
    # inner storage through the wrapper's other methods, or not at all.
    own = set(vars(optuna_adapter.RetryingStorage)) | set(vars(optuna_adapter.RetryingHeartbeatStorage))
    assert methods - own == set()


def test_the_private_names_sweeper_uses_keep_their_shape() -> None:
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages._grpc.server import make_server
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import RDBStorage, _create_scoped_session
    from optuna.study._tell import _tell_with_warning

    assert list(inspect.signature(_tell_with_warning).parameters)[:5] == [
        "study", "trial", "value_or_values", "state", "skip_if_finished"]
    assert list(inspect.signature(RDBStorage._get_trials).parameters) == [
        "self", "study_id", "states", "included_trial_ids", "trial_id_greater_than"]
    assert "_get_trials" in inspect.getsource(_CachedStorage._read_trials_from_remote_storage)
    assert callable(_create_scoped_session) and hasattr(RDBStorage, "_build_frozen_trial_from_trial_model")
    assert list(inspect.signature(make_server).parameters)[:3] == ["storage", "host", "port"]
    assert hasattr(models.TrialModel, "_datetime_start_utc") and hasattr(models.TrialHeartbeatModel, "heartbeat")
    assert "cached_all_trials" in inspect.getsource(optuna.study.Study._get_trials)


# --------------------------------------------------------------------------- retries in one place


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_read_during_an_outage_waits_for_the_server_and_a_trial_is_never_added_twice(private_pg) -> None:  # type: ignore[no-untyped-def]
    """Real PostgreSQL, stopped and started again: a retried call goes through once the server
    is back; creating a trial (left out of the retries) fails at once instead."""
    study = _study(private_pg.url())
    budget.ensure_tickets(study, 2)
    storage = optuna_adapter.storage_of(study)
    private_pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(Exception) as refused:
            storage.create_new_trial(optuna_adapter.study_id(study))
        # Not repeated by sweeper (a lost answer could add a trial twice): it fails after
        # Optuna's own five attempts for deadlocks (at most 8 s of sleep), not after 300 s.
        assert time.monotonic() - started < 20
        assert optuna_adapter.is_transient(refused.value)
        threading.Timer(2.0, private_pg.start).start()
        started = time.monotonic()
        trials = storage.get_all_trials(optuna_adapter.study_id(study), deepcopy=False)
        assert time.monotonic() - started >= 1.5, "it waited for the server"
    finally:
        time.sleep(0.1)
        private_pg.start() if not _is_up(private_pg) else None
    assert [t.state for t in trials] == [TrialState.WAITING] * 2
    assert len(study.get_trials(deepcopy=False)) == 2
    storage.dispose()


def _is_up(server) -> bool:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", server.port)) == 0


def test_patience_bounds_how_long_a_call_is_repeated() -> None:
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise optuna.exceptions.StorageInternalError("could not connect to server: Connection refused")

    started = time.monotonic()
    with optuna_adapter.patience(1.0), pytest.raises(optuna.exceptions.StorageInternalError):
        optuna_adapter.call_with_retries(down, what="a test")
    assert 1.0 <= time.monotonic() - started < 4 and len(calls) >= 2
    with pytest.raises(ValueError):  # not transient: raised at the first failure
        optuna_adapter.call_with_retries(lambda: int("x"), what="a test")


# --------------------------------------------------------------------------- what Optuna must keep doing


def test_a_ticket_is_claimed_by_exactly_one_storage(storage_url: str) -> None:
    study = _study(storage_url)
    budget.ensure_tickets(study, 1)
    other = open_storage(storage_url, heartbeat_interval=None, grace_period=None)
    [ticket_id] = optuna_adapter.waiting_trial_ids(study)
    assert optuna_adapter.storage_of(study).set_trial_state_values(ticket_id, TrialState.RUNNING) is True
    assert other.set_trial_state_values(ticket_id, TrialState.RUNNING) is False
    assert optuna_adapter.waiting_trial_ids(study) == []
    other.dispose()


def test_tickets_are_claimed_oldest_first_with_their_fixed_values(storage_url: str) -> None:
    study = _study(storage_url)
    budget.ensure_tickets(study, 3, first=[{"x": 0.25}])
    trial = claim(study)
    assert trial is not None and trial.number == 0
    assert trial.suggest_float("x", 0.0, 1.0) == 0.25, "Optuna's fixed_params are what suggest returns"
    optuna_adapter.tell_without_readback(study, trial, TrialState.COMPLETE, 0.5)
    optuna_adapter.tell_without_readback(study, trial, TrialState.FAIL)  # a repeat is skipped, not applied
    [done] = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert (done.number, done.value) == (0, 0.5)
    assert [claim(study).number for _ in range(2)] == [1, 2]  # type: ignore[union-attr]


def test_a_silent_trial_is_reaped_and_its_retry_is_one_optuna_recognises(storage_url: str) -> None:
    study = _study(storage_url, heartbeat=1, grace=3)
    budget.ensure_tickets(study, 2)
    beating, silent = claim(study), claim(study)
    assert beating is not None and silent is not None
    storage = optuna_adapter.storage_of(study)
    storage.record_heartbeat(optuna_adapter.trial_id(beating))  # type: ignore[attr-defined]
    silences = optuna_adapter.trial_silences(study)
    assert silences is not None and set(silences) == {optuna_adapter.trial_id(beating), optuna_adapter.trial_id(silent)}
    assert liveness.reap(study, 3, RetryCallback(3)) == [], "nobody is stale yet"
    # Ten minutes later by the reaper's clock: both are stale, the one that never beat too.
    later = lambda: time.time() + 600  # noqa: E731
    assert sorted(liveness.reap(study, 3, RetryCallback(3), clock=later)) == [beating.number, silent.number]
    retries = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert sorted(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in retries) == [0, 1]  # type: ignore[type-var]
    assert liveness.reap(study, 3, RetryCallback(3), clock=later) == [], "a reaped trial is not reaped twice"


def test_a_retry_is_queued_once_however_often_it_is_asked_for(storage_url: str) -> None:
    study = _study(storage_url)
    budget.ensure_tickets(study, 1)
    trial = claim(study)
    assert trial is not None
    failed = study.tell(trial, state=TrialState.FAIL)
    RetryCallback(3)(study, failed)
    RetryCallback(3)(study, failed)  # the reaper and the worker both saw it die
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL, TrialState.WAITING]
