from __future__ import annotations

import optuna
import pytest

from sweeper.space import Categorical, Float, Int, LogFloat, check, parse_override, sample


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
