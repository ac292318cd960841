from __future__ import annotations

import optuna
import pytest

from sweeper.space import Categorical, Float, Int, LogFloat, check, first_trial_params, parse_override, sample


def test_range_override_keeps_the_distribution_type() -> None:
    assert parse_override(LogFloat(1e-6, 1e-3), "1e-5..1e-4") == LogFloat(1e-5, 1e-4)
    assert parse_override(Int(0, 12), "2..6") == Int(2, 6)
    assert parse_override(Float(0.0, 0.5), "0.1..0.2") == Float(0.1, 0.2)


def test_new_range_guesses_a_type_from_its_bounds() -> None:
    assert parse_override(None, "1..4") == Int(1, 4)
    assert parse_override(None, "1e-5..1e-2") == LogFloat(1e-5, 1e-2)
    assert parse_override(None, "0.0..0.3") == Float(0.0, 0.3)


def test_list_becomes_categorical_and_a_value_a_constant() -> None:
    assert parse_override(None, "[16, 32]") == Categorical([16, 32])
    assert parse_override(LogFloat(1e-6, 1e-3), "3e-5") == 3e-5
    assert parse_override(None, "true") is True


def test_bad_range_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a number"):
        parse_override(None, "a..b")


def test_check_reports_every_problem() -> None:
    problems = check({"a": LogFloat(0.0, 1.0), "b": Float(2.0, 1.0), "c": Categorical([]), "d": object()})
    assert len(problems) == 4
    assert "low > 0" in problems[0] and "swap" in problems[1]


def test_sample_suggests_distributions_and_passes_constants() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = sample({"lr": LogFloat(1e-5, 1e-3), "depth": Int(0, 3), "bs": 32}, trial)
    assert 1e-5 <= values["lr"] <= 1e-3 and 0 <= values["depth"] <= 3 and values["bs"] == 32
    assert set(trial.params) == {"lr", "depth"}


def test_center_is_the_middle_of_each_range_on_the_scale_it_is_drawn_on() -> None:
    assert LogFloat(1e-6, 1e-2).center() == pytest.approx(1e-4)
    assert Float(0.0, 0.3).center() == pytest.approx(0.15)
    assert Float(0.0, 0.4, step=0.1).center() == pytest.approx(0.2) and Float(0.0, 0.5, step=0.25).center() == 0.25
    assert Int(0, 6).center() == 3 and Int(0, 12, step=4).center() == 8
    assert Categorical([16, 32, 64]).center() == 16


def test_a_distribution_contains_only_what_it_can_draw() -> None:
    assert LogFloat(1e-5, 1e-3).contains(1e-4) and not LogFloat(1e-5, 1e-3).contains(1e-2)
    assert Int(0, 6).contains(6) and not Int(0, 6).contains(2.5) and not Int(0, 6).contains(True)
    assert not Int(0, 12, step=4).contains(6)
    assert Categorical([0.0, 0.1]).contains(0.1) and not Categorical([0, 1]).contains(True)
    assert not Float(0.0, 1.0).contains(float("nan")) and not Float(0.0, 1.0).contains("0.5")


def test_first_trials_take_searched_values_inside_their_ranges_or_the_center() -> None:
    space = {"learning_rate": LogFloat(1e-5, 1e-3), "unfreeze_depth": Int(0, 6), "batch_size": 32}
    points, problems = first_trial_params(space, ["center", {"learning_rate": 3e-5}])
    assert problems == []
    assert points == [{"learning_rate": pytest.approx(1e-4), "unfreeze_depth": 3}, {"learning_rate": 3e-5}]
    _, problems = first_trial_params(space, [{"learning_rate": 1.0, "unfreeze_depth": 3, "batch_size": 16,
                                              "lr": 1e-4}, "middle"])
    assert len(problems) == 4, problems  # every problem at once, each naming its entry
    assert "`first_trials[0]` sets `learning_rate` to 1.0, outside `space.learning_rate`" in problems[0]
    assert "fixes at 32" in problems[1] and "`lr`, which the space does not have" in problems[2]
    assert "`first_trials[1]` is 'middle'" in problems[3]
    assert "give a list" in first_trial_params(space, {"learning_rate": 1e-4})[1][0]
