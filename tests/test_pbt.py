"""``scheduler="pbt"``: the arithmetic of ranking, exploiting and exploring against hand-computed
cases, an exploit that hands over exactly the donor's weights and optimizer state, a member that
continues as one uninterrupted trial, the study checks, and exact budgets with real worker
processes on SQLite and PostgreSQL (``sweeper/pbt.py``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, checkpoints, launcher, optuna_adapter, pbt, record
from sweeper import space as space_mod
from sweeper.errors import ConfigError, SweepError
from sweeper.objective import Objective
from sweeper.outcome import WorkerInfo
from sweeper.space import Categorical, Float, Int, LogFloat
from sweeper.storage import open_storage
from sweeper.study import load as load_sweep
from sweeper.worker import RetryCallback, _tell, claim, hand_back
from tests.helpers import ROOT, run_cli, write_study

MAX, MIN = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE


def _seg(trial: optuna.Trial | FrozenTrial) -> dict[str, Any]:
    """``trial``'s PBT record, which every trial of these sweeps has."""
    segment = pbt.segment_of(trial)
    assert segment is not None, f"trial {trial.number} has no PBT record"
    return segment

# --------------------------------------------------------------------------- the arithmetic


def test_quantiles_follow_ray_tunes_rule_and_never_overlap() -> None:
    # ceil(n * q), or floor(n / 2) where that is more.
    assert [pbt.quantile_size(n, 0.25) for n in range(1, 10)] == [0, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [pbt.quantile_size(n, 0.5) for n in range(1, 6)] == [0, 1, 1, 2, 2]
    entries = [pbt.Entry(n, n, v) for n, v in enumerate([0.5, 0.9, 0.7, 0.1, 0.8])]
    top, bottom = pbt.quantiles(entries, 0.25, MAX)  # ceil(1.25) = 2 of 5
    assert [e.number for e in top] == [1, 4] and [e.number for e in bottom] == [0, 3]
    top, bottom = pbt.quantiles(entries, 0.25, MIN)  # a loss: lowest first
    assert [e.number for e in top] == [3, 0] and [e.number for e in bottom] == [4, 1]
    assert pbt.quantiles(entries[:1], 0.5, MAX) == ([], []), "alone, a segment is in neither quantile"


def test_a_tie_goes_to_the_earlier_trial() -> None:
    entries = [pbt.Entry(7, 0, 0.5), pbt.Entry(3, 1, 0.5), pbt.Entry(5, 2, 0.5), pbt.Entry(9, 3, 0.5)]
    top, bottom = pbt.quantiles(entries, 0.25, MAX)
    assert [e.number for e in top] == [3] and [e.number for e in bottom] == [9]


def test_perturbation_multiplies_and_clips_to_the_range_and_its_grid() -> None:
    lr = LogFloat(1e-4, 1e-2)
    assert pbt.perturb(1e-3, lr, 1.2) == pytest.approx(1.2e-3)
    assert pbt.perturb(1e-3, lr, 0.8) == pytest.approx(0.8e-3)
    assert pbt.perturb(9e-3, lr, 1.2) == 1e-2 and pbt.perturb(1.1e-4, lr, 0.8) == 1e-4, "clipped"
    assert pbt.perturb(0.25, Float(0.0, 0.3), 1.2) == 0.3
    grid = Float(0.0, 1.0, step=0.25)
    assert pbt.perturb(0.5, grid, 1.2) == 0.5 and pbt.perturb(0.75, grid, 1.2) == 1.0  # 0.6 -> 0.5, 0.9 -> 1.0
    assert pbt.perturb(7, Int(1, 9, step=2), 1.2) == 9 and pbt.perturb(3, Int(1, 9, step=2), 0.8) == 3
    assert pbt.perturb(9, Int(1, 10, step=2), 1.2) == 9, "the last point of the grid, not the bound"


def test_resampling_draws_from_the_space_as_its_prior_does() -> None:
    rng = random.Random(0)
    draws = [pbt.resample(LogFloat(1e-6, 1e-2), rng) for _ in range(2000)]
    assert all(1e-6 <= d <= 1e-2 for d in draws)
    below = sum(d < 1e-4 for d in draws) / len(draws)  # 1e-4 is the middle on the log scale
    assert 0.45 < below < 0.55
    assert {pbt.resample(Int(1, 5, step=2), rng) for _ in range(200)} == {1, 3, 5}
    assert {pbt.resample(Float(0.0, 1.0, step=0.5), rng) for _ in range(200)} == {0.0, 0.5, 1.0}
    assert {pbt.resample(Categorical(["a", "b"]), rng) for _ in range(50)} == {"a", "b"}


def test_a_categorical_moves_to_a_neighbouring_choice_and_stays_at_the_ends() -> None:
    dist = Categorical([0.0, 0.1, 0.2])
    rng = random.Random(1)
    assert {pbt.neighbour(0.1, dist, rng) for _ in range(50)} == {0.0, 0.2}
    assert {pbt.neighbour(0.0, dist, rng) for _ in range(50)} == {0.0, 0.1}


SPACE: dict[str, Any] = {"learning_rate": LogFloat(1e-5, 1e-2), "weight_decay": Float(0.0, 0.1),
                         "unfreeze_depth": Int(0, 2), "batch_size": Categorical([16, 32]), "warmup_ratio": 0.1}
PARAMS = {"learning_rate": 1e-3, "weight_decay": 0.05, "unfreeze_depth": 1, "batch_size": 16}


def test_explore_perturbs_or_resamples_the_continuous_values_only() -> None:
    perturbed, changes = pbt.explore(PARAMS, SPACE, random.Random(3), 0.0, (1.2, 0.8))
    assert set(changes) == {"learning_rate", "weight_decay"}, "structural values and constants stay"
    for name in changes:
        by = changes[name]["by"]
        assert by in (1.2, 0.8) and perturbed[name] == pytest.approx(PARAMS[name] * by)
        assert changes[name]["from"] == PARAMS[name] and changes[name]["to"] == perturbed[name]
    assert (perturbed["unfreeze_depth"], perturbed["batch_size"]) == (1, 16)
    resampled, changes = pbt.explore(PARAMS, SPACE, random.Random(3), 1.0, (1.2, 0.8))
    assert {c["by"] for c in changes.values()} == {"resample"}
    assert SPACE["learning_rate"].contains(resampled["learning_rate"]) and resampled["learning_rate"] != 1e-3
    again = pbt.explore(PARAMS, SPACE, random.Random(3), 0.5, (1.2, 0.8))
    assert again == pbt.explore(PARAMS, SPACE, random.Random(3), 0.5, (1.2, 0.8)), "one rng, one result"


def test_a_segment_ends_after_its_interval_or_at_the_end_of_the_run() -> None:
    segment = {"start_evaluation": 2}
    assert [e for e in range(3, 9) if pbt.ends_at(e, segment, 3, 8)] == [5, 6, 7, 8]  # 5 ends it
    assert pbt.ends_at(3, {"start_evaluation": 2}, 3, 3), "the run's last evaluation ends the last segment"


def _segment(number: int, member: int, generation: int, end: int | None, value: float,
             state: TrialState = TrialState.COMPLETE) -> FrozenTrial:
    seg: dict[str, Any] = {"member": member, "generation": generation, "start_evaluation": end - 1 if end else 0}
    if end is not None:
        seg["end"] = {"evaluation": end, "value": value, "step": 10 * end, "evaluations": 4}
    trial = optuna.trial.create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                                      system_attrs={record.PBT.key: seg})
    trial.number = number
    return trial


def test_a_segment_is_ranked_among_each_members_latest_segment_at_the_same_evaluation() -> None:
    trials = [
        _segment(0, 0, 0, 1, 0.9), _segment(1, 1, 0, 1, 0.2),
        _segment(2, 0, 1, 2, 0.95),  # member 0 at evaluation 2: not ranked at 1
        _segment(3, 1, 0, 1, 0.3, TrialState.RUNNING),  # member 1's retry, ended again: stands for trial 1
        _segment(4, 2, 0, None, 0.0, TrialState.RUNNING),  # not ended yet
        _segment(5, 3, 0, 1, 0.1, TrialState.WAITING),  # a waiting retry with a record: not ranked
    ]
    current = pbt.Entry(6, 4, 0.5)
    assert sorted(pbt.ranked_at(trials, 1, current), key=lambda e: e.number) == [
        pbt.Entry(0, 0, 0.9), pbt.Entry(3, 1, 0.3), current]
    assert pbt.ranked_at(trials, 1, pbt.Entry(7, 1, 0.4)) == [pbt.Entry(0, 0, 0.9), pbt.Entry(7, 1, 0.4)]


def test_a_retry_keeps_its_segment_but_not_its_end() -> None:
    segment = {"member": 0, "generation": 2, "parent": 5, "decision": "exploit", "end": {"evaluation": 3}}
    assert pbt.for_retry(segment) == {"member": 0, "generation": 2, "parent": 5, "decision": "exploit"}


# --------------------------------------------------------------------------- the study checks

PBT_STUDY = """
    from sweeper import Int, LogFloat, Sweep, SyntheticText, TinyTextClassifier

    sweep = Sweep(
        name="NAME",
        model=TinyTextClassifier(layers=2, hidden=32, heads=2),
        data=SyntheticText(n_train=400, n_test=100),
        space={"learning_rate": LogFloat(1e-5, 1e-2), "unfreeze_depth": 1, "pretrain_loss_weight": 0.1},
        pretrain_loss="l2sp",
        epochs=1,
        evals_per_epoch=EVALS,
        metric="loss",
        direction="minimize",
        n_trials=N_TRIALS,
        scheduler="pbt",
        population=POPULATION,
        perturbation_interval=1,
        quantile=0.5,
        resample_probability=0.0,
        first_trials=FIRST,
        pruner="none",
        output_dir="OUTPUT_DIR",
    )
"""


def _study_file(folder: Path, name: str = "pbt", *, population: int = 2, evaluations: int = 2,
                first: str = '[{"learning_rate": 3e-3}, {"learning_rate": 1e-5}]') -> Path:
    body = (PBT_STUDY.replace("NAME", name).replace("EVALS", str(evaluations)).replace("POPULATION", str(population))
            .replace("N_TRIALS", str(population * evaluations)).replace("FIRST", first))
    return write_study(folder, body, name=f"{name}.py")


def test_pbt_is_refused_where_a_segment_cannot_hand_its_state_on(tmp_path: Path) -> None:
    path = _study_file(tmp_path)
    cases = (
        (["array_size=2"], "`scheduler` is 'pbt' and `array_size` is 2"),
        (["pruner=asha"], "`scheduler` is 'pbt' and `pruner` is 'asha'"),
        (["n_trials=5"], "`n_trials` is 5, but 2 members of 2 segments each"),
        (["population=5"], "`population` is 5 but `n_trials` is 4"),
        (["quantile=0.6"], "`quantile` is 0.6"),
        (["perturbation_factors=[1.2,-1]"], "`perturbation_factors` is (1.2, -1)"),
        (["perturbation_interval=0"], "`perturbation_interval` is 0"),
    )
    for overrides, expected in cases:
        with pytest.raises(ConfigError) as caught:
            load_sweep(str(path), overrides)
        assert expected in str(caught.value), (overrides, str(caught.value))
    assert load_sweep(str(path), ["n_trials=3"]).n_trials == 3, "a smaller budget ends the last generation early"


def test_pbt_with_a_study_of_its_own_train_function_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_study(tmp_path, """
        from sweeper import LogFloat, Sweep

        def train(params, device, seed, context):
            return 0.5

        sweep = Sweep(name="own", train=train, space={"lr": LogFloat(1e-4, 1e-2)}, metric="score",
                      scheduler="pbt", population=2, n_trials=4, output_dir="OUTPUT_DIR")
    """)
    result = run_cli("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert "`scheduler` is 'pbt', which hands weights and optimizer state" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_population_defaults_to_the_worker_slots_of_the_first_launch(tmp_path: Path) -> None:
    """Without `population`, the first launch starts one member per worker slot and records
    it; a relaunch with more workers goes on with the same members, adding none."""
    path = write_study(tmp_path, PBT_STUDY.replace("NAME", "slots").replace("EVALS", "2").replace("N_TRIALS", "6")
                       .replace("population=POPULATION", "population=None").replace("FIRST", "[]"))
    sweep = load_sweep(str(path), [])
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = launcher.prepare_study(sweep, launcher.LaunchOptions(str(path), [], url, workers=3))
    assert record.POPULATION.get(study) == 3
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert len(waiting) == 3, "the first segment of each of the 3 members, no more"
    again = launcher.prepare_study(sweep, launcher.LaunchOptions(str(path), [], url, workers=5))
    assert record.POPULATION.get(again) == 3 and len(again.get_trials(deepcopy=False)) == 3
    # More slots than the budget has trials: one line, exit 2, before a ticket is added.
    folder = tmp_path / "more"
    folder.mkdir()
    too_many = write_study(folder, PBT_STUDY.replace("NAME", "more").replace("EVALS", "2").replace("N_TRIALS", "4")
                           .replace("population=POPULATION", "population=None").replace("FIRST", "[]"))
    result = run_cli("launch", str(too_many), "--workers", "5")
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("the population (one member per worker slot, --workers 5) is 5 but `n_trials` is 4"
            in result.stderr), result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- real segments, one process


def _objective(path: Path, url: str, overrides: list[str] | None = None) -> tuple[optuna.Study, Objective]:
    sweep = load_sweep(str(path), overrides or [])
    storage = open_storage(url, heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(study_name=sweep.name, storage=storage, direction=record.direction_of(sweep.direction))
    first, _ = space_mod.first_trial_params(sweep.space, sweep.first_trials)
    queue = sweep.population if sweep.scheduler == "pbt" else None  # these studies set it
    budget.ensure_tickets(study, sweep.n_trials, first, queue=queue)
    return study, Objective(sweep, study, WorkerInfo(0), checkpoints.open_store(None, sweep.output_path))


def _run(study: optuna.Study, objective: Objective, number: int | None = None) -> FrozenTrial:
    """Claim the oldest ticket (or trial ``number``), run it and tell it."""
    accept = None if number is None else (lambda t: t.number == number)
    trial = claim(study, accept)
    assert trial is not None and (number is None or trial.number == number)
    _tell(study, trial, objective.run(trial), RetryCallback(0))
    return optuna_adapter.frozen(study, trial)


def _resume_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "out" / "artifacts").glob("resume-*"))


# The test prepares the exploiting segment once itself, to look at its start: its run reports the replay again.
@pytest.mark.filterwarnings("ignore:The reported value is ignored")
def test_an_exploit_hands_over_exactly_the_donors_weights_and_optimizer_state(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, objective = _objective(_study_file(tmp_path), url)
    assert len(study.get_trials(deepcopy=False)) == 2, "the first generation only: the population's tickets"

    fast = _run(study, objective)  # learning rate 3e-3; alone at evaluation 1: continues
    assert fast.state == TrialState.COMPLETE and fast.value == fast.intermediate_values[1], "its last evaluation"
    assert _seg(fast)["end"]["evaluation"] == 1
    slow = _run(study, objective)  # 1e-5: the worse of two at evaluation 1, the bottom half
    assert slow.value is not None and fast.value is not None and slow.value > fast.value
    trials = {_seg(t)["member"]: t for t in study.get_trials(deepcopy=False)
              if t.state == TrialState.WAITING}
    fast_next, slow_next = trials[fast.number], trials[slow.number]
    assert _seg(fast_next) | {"at": 0} == {
        "member": fast.number, "generation": 1, "parent": fast.number, "previous": fast.number,
        "start_step": _seg(fast)["end"]["step"], "start_evaluation": 1, "decision": "continue",
        "rank": 1, "of": 1, "value": fast.value, "at": 0}
    exploit = _seg(slow_next)
    assert (exploit["decision"], exploit["parent"], exploit["previous"], exploit["rank"], exploit["of"]) == (
        "exploit", fast.number, slow.number, 2, 2)
    change = exploit["explore"]["learning_rate"]
    assert change["from"] == fast.params["learning_rate"] and change["by"] in (1.2, 0.8)
    assert slow_next.params["learning_rate"] == pytest.approx(3e-3 * change["by"])
    assert record.RESUME.get(optuna_adapter.frozen(study, slow)) is None, "nobody starts from the slow one's state"
    assert len(_resume_files(tmp_path)) == 1, "only the donor's state is left"

    # What the exploiting segment starts from, against the donor's saved state: equal tensors.
    donor_state = checkpoints.load_resume(objective.store, record.RESUME.get(optuna_adapter.frozen(study, fast))["id"])
    child = claim(study, lambda t: t.number == slow_next.number)
    assert child is not None
    prepared = objective.prepare(child)
    start = prepared.resume
    assert start is not None and start.step == donor_state.step == exploit["start_step"] > 0
    assert start.model.keys() == donor_state.model.keys() and start.model
    assert all(torch.equal(start.model[k], donor_state.model[k]) for k in donor_state.model)
    moments = donor_state.optimizer["state"]
    assert moments and start.optimizer["state"].keys() == moments.keys()
    for slot, values in moments.items():
        assert {"exp_avg", "exp_avg_sq"} <= values.keys()
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(start.optimizer["state"][slot][key]), torch.as_tensor(value)), key
    assert prepared.hyper.learning_rate == slow_next.params["learning_rate"], "with its own hyperparameters"
    assert record.SEED.get(child) == record.SEED.get(slow), "and its member's seed"
    _tell(study, child, objective.run(child), RetryCallback(0))
    done = optuna_adapter.frozen(study, child)
    assert done.state == TrialState.COMPLETE and done.intermediate_values[1] == fast.intermediate_values[1], \
        "its curve starts with the donor's evaluations"
    assert done.value == done.intermediate_values[2] and record.BEST_EVALUATION.get(done) == 2
    assert record.CHECKPOINT.get(done)["evaluation"] == 2, "its model checkpoint: the member's model at the end"
    assert record.RESUMED_FROM_STEP.get(done) == donor_state.step
    # The optimizer trained on with the segment's learning rate, not the donor's.
    end_state = checkpoints.load_resume(objective.store, record.RESUME.get(done)["id"])
    assert [g["initial_lr"] for g in end_state.optimizer["param_groups"]] == \
        [slow_next.params["learning_rate"]] * len(end_state.optimizer["param_groups"])
    assert end_state.scheduler["base_lrs"] == [slow_next.params["learning_rate"]] * len(end_state.scheduler["base_lrs"])

    last = _run(study, objective)  # the fast member's second segment: the run's end, nothing queued after it
    assert _seg(last)["end"]["evaluation"] == 2 and last.number == fast_next.number
    trials_now = study.get_trials(deepcopy=False)
    assert len(trials_now) == 4 and all(t.state == TrialState.COMPLETE for t in trials_now)
    assert claim(study) is None, "exactly n_trials: population 2 x 2 segments"
    assert _resume_files(tmp_path) == [], "no state left that a segment could start from"


def test_a_member_that_always_continues_trains_as_one_uninterrupted_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = _study_file(tmp_path, population=1, evaluations=3, first='[{"learning_rate": 3e-3}]')
    whole_study, whole = _objective(path, url, ["scheduler=none", "name=whole"])
    reference = _run(whole_study, whole)
    assert len(reference.intermediate_values) == 3

    study, objective = _objective(path, url)
    segments = [_run(study, objective) for _ in range(3)]
    assert claim(study) is None and [_seg(t)["generation"] for t in segments] == [0, 1, 2]
    assert [_seg(t)["decision"] for t in segments] == ["start", "continue", "continue"]
    assert segments[-1].intermediate_values == reference.intermediate_values, "bit for bit, every evaluation"
    assert record.STEPS.get(segments[-1]) == record.STEPS.get(reference)
    assert [t.value for t in segments] == [reference.intermediate_values[e] for e in (1, 2, 3)]


def test_a_segment_cut_off_between_its_end_and_its_tell_ends_its_retry_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, objective = _objective(_study_file(tmp_path, population=1, first='[{"learning_rate": 3e-3}]'), url)
    trial = claim(study)
    assert trial is not None
    outcome = objective.run(trial)  # it ended its segment and queued its member's next one ...
    assert outcome.state == TrialState.COMPLETE
    hand_back(study, trial, RetryCallback(3), "cut off before it was told")  # ... and is failed instead of told
    [following, retry] = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert (_seg(following)["generation"], _seg(following)["parent"]) == (1, trial.number)
    assert _seg(retry) == {k: v for k, v in _seg(optuna_adapter.frozen(study, trial)).items() if k != "end"}
    assert _run(study, objective, following.number).state == TrialState.COMPLETE, "its parent's state was kept"
    again = _run(study, objective, retry.number)
    assert again.state == TrialState.COMPLETE and again.value == outcome.value, "ended where the attempt ended"
    assert record.RESUMED_FROM_STEP.get(again) == record.STEPS.get(again) == _seg(following)["start_step"]
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3 and claim(study) is None, "no second successor: the one queued is found"
    tally = budget.tally(trials)
    assert (tally.finished, tally.retried) == (2, 1)
    assert _resume_files(tmp_path) == []


# --------------------------------------------------------------------------- the whole sweep, real workers


def _sweep(folder: Path, url: str | None, workers: int) -> optuna.Study:
    path = _study_file(folder, population=3, evaluations=3,
                       first='[{"learning_rate": 3e-3}, {"learning_rate": 1e-5}, {"learning_rate": 2e-5}]')
    env = {"SWEEPER_STORAGE": url} if url else {}
    result = run_cli("launch", str(path), "--workers", str(workers), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return optuna.load_study(study_name="pbt", storage=url or f"sqlite:///{folder / 'out' / 'study.db'}")


def _assert_exact(study: optuna.Study, folder: Path, population: int = 3, segments: int = 3) -> None:
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(population * segments)), "exactly n_trials, no more"
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert record.N_TRIALS.get(study) == population * segments
    by_number = {t.number: t for t in trials}
    members: dict[int, list[int]] = {}
    for t in trials:
        seg = _seg(t)
        assert seg is not None and seg["end"]["evaluation"] == seg["start_evaluation"] + 1
        members.setdefault(seg["member"], []).append(seg["generation"])
        assert t.value == t.intermediate_values[seg["end"]["evaluation"]], "a segment's value: its last evaluation"
        if seg["generation"] == 0:
            assert (seg["decision"], seg["parent"]) == ("start", None)
            continue
        parent = _seg(by_number[seg["parent"]])
        previous = _seg(by_number[seg["previous"]])
        assert seg["decision"] in ("continue", "exploit") and 1 <= seg["rank"] <= seg["of"] <= population
        assert previous["member"] == seg["member"] and previous["generation"] == seg["generation"] - 1
        assert parent["end"]["evaluation"] == seg["start_evaluation"] and parent["end"]["step"] == seg["start_step"]
        if seg["decision"] == "continue":
            assert seg["parent"] == seg["previous"] and t.params == by_number[seg["parent"]].params
        else:
            assert seg["parent"] != seg["previous"] and seg["explore"]
    assert {m: sorted(g) for m, g in members.items()} == {m: list(range(segments)) for m in members}
    assert len(members) == population
    assert _resume_files(folder) == [], "no resume state left behind"


# About 30 s each (two workers load PyTorch): PostgreSQL's runs in the long set.
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.long])])
def test_budget_is_exact_with_real_workers_and_every_later_segment_has_a_parent(  # type: ignore[no-untyped-def]
        backend: str, request, tmp_path: Path) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    study = _sweep(tmp_path, url, workers=2)
    _assert_exact(study, tmp_path)
    if backend == "sqlite":
        _assert_best_and_report(study, tmp_path)


def _assert_best_and_report(study: optuna.Study, folder: Path) -> None:
    """``sweeper best`` writes the best segment's schedule, its lineage followed back to a
    first segment; ``sweeper report`` draws the lineage."""
    out = folder / "best"
    result = run_cli("best", str(folder / "pbt.py"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    schedule = json.loads((out / "schedule.json").read_text())
    best = study.best_trial
    assert schedule[-1]["trial"] == best.number and schedule[0]["decision"] == "start"
    assert [s["generation"] for s in schedule] == list(range(len(schedule)))
    for earlier, later in zip(schedule, schedule[1:]):
        assert later["parent"] == earlier["trial"] and later["start_step"] == earlier["end_step"]
    assert schedule[-1]["params"] == best.params
    page = folder / "report.html"
    result = run_cli("report", str(folder / "pbt.py"), "--out", str(page))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'id="plot-lineage"' in page.read_text()


# --------------------------------------------------------------------------- kill -9 during an exploit


def _watch(url: str, name: str, found: Any, launcher: subprocess.Popen[str], timeout: float = 240) -> FrozenTrial:
    """The first trial ``found`` accepts, read every few tenths of a second through one storage."""
    deadline, storage, trials = time.time() + timeout, None, []
    try:
        while time.time() < deadline:
            try:
                storage = storage or open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
                trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            except (SweepError, KeyError):  # not created yet
                trials = []
            caught = next((t for t in trials if found(t)), None)
            if caught is not None:
                return caught
            if launcher.poll() is not None:
                raise AssertionError(f"the launcher ended before the trial was caught: {launcher.communicate()[1][-3000:]}")
            time.sleep(0.1)
    finally:
        if storage is not None:
            storage.engine.dispose()
    launcher.kill()
    raise AssertionError(f"no trial caught: {[(t.number, t.state.name, pbt.segment_of(t)) for t in trials]}")


def _exploiting_after_its_own_first_evaluation(trial: FrozenTrial) -> bool:
    segment, resume = pbt.segment_of(trial) or {}, record.RESUME.get(trial)
    return (trial.state == TrialState.RUNNING and segment.get("decision") == "exploit" and resume is not None
            and resume["step"] > segment["start_step"])


@pytest.mark.long
@pytest.mark.timeout(400)
def test_kill_9_during_an_exploiting_segment_resumes_its_retry_and_the_budget_stays_exact(tmp_path: Path) -> None:
    # One worker, so the order is known: the fast member ends its first segment alone and goes
    # on; the slow one ends second, worse, and exploits it. Two evaluations a segment, so the
    # exploiting one saves a state of its own before its end: the kill comes after that.
    path = _study_file(tmp_path, evaluations=4)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    sets = ["perturbation_interval=2", "n_trials=4", "data.n_train=8000", "space.unfreeze_depth=2",
            "space.pretrain_loss_weight=0.001"]  # a model that learns: the fast member is the better one
    launcher = subprocess.Popen(
        [sys.executable, "-m", "sweeper", "launch", str(path), "--workers", "1", "--heartbeat", "1", "--grace", "6",
         *[arg for item in sets for arg in ("--set", item)]], cwd=ROOT, env={**os.environ, "SWEEPER_STORAGE": url},
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    victim = _watch(url, "pbt", _exploiting_after_its_own_first_evaluation, launcher)
    saved_step = record.RESUME.get(victim)["step"]
    os.kill(record.PID.get(victim), signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="pbt", storage=url)
    trials = study.get_trials(deepcopy=False)
    killed = next(t for t in trials if t.number == victim.number)
    [retry] = [t for t in trials if record.FAILED_TRIAL.get(t) == victim.number]
    assert killed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == victim.params
    kept = {k: v for k, v in _seg(retry).items() if k != "end"}
    assert kept == _seg(victim), "the same segment of the same member: its parent and decision kept"
    assert retry.user_attrs["resumed_from_step"] == saved_step > _seg(victim)["start_step"], \
        "it continued from its own state, not from its parent's"
    assert record.SEED.get(retry) == record.SEED.get(victim)
    assert retry.intermediate_values[2] == next(t for t in trials if t.number == _seg(victim)["parent"]) \
        .intermediate_values[2], "its curve still begins with the donor's"
    tally = budget.tally(trials)
    assert (tally.finished, tally.complete, tally.retried, tally.waiting, tally.running) == (4, 4, 1, 0, 0)
    generations: dict[int, list[int]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            generations.setdefault(_seg(t)["member"], []).append(_seg(t)["generation"])
    assert {m: sorted(g) for m, g in generations.items()} == {0: [0, 1], 1: [0, 1]}
    assert _resume_files(tmp_path) == []
