"""Search-space types and their mapping onto Optuna's ``trial.suggest_*``.

A study declares its space as a ``dict`` of name -> distribution::

    space = {
        "learning_rate": LogFloat(1e-6, 1e-3),
        "unfreeze_depth": Int(0, 12),
        "dropout": Categorical([0.0, 0.1]),
        "warmup_ratio": 0.06,             # a plain value is a constant, not searched
    }

From the command line a distribution can be narrowed or fixed without editing the study:
``--set space.learning_rate=1e-5..1e-4`` keeps its type and changes its bounds,
``--set space.learning_rate=3e-5`` fixes it, ``--set space.dropout=[0.0,0.2]`` makes it
categorical.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import optuna


@dataclass(frozen=True)
class Float:
    """A float drawn uniformly from ``[low, high]`` (optionally on a grid of ``step``)."""

    low: float
    high: float
    step: float | None = None

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def check(self, name: str) -> list[str]:
        return _check_bounds(name, self.low, self.high)

    def with_bounds(self, low: float, high: float) -> Float:
        return Float(low, high, self.step)

    def contains(self, value: Any) -> bool:
        if not _real(value) or not self.low <= value <= self.high:
            return False
        return self.step is None or _on_grid(value - self.low, self.step)

    def center(self) -> float:
        middle = (self.low + self.high) / 2
        if self.step is None:
            return middle
        return self.low + round((middle - self.low) / self.step) * self.step

    def __str__(self) -> str:
        return f"Float({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class LogFloat:
    """A positive float drawn log-uniformly from ``[low, high]``: learning rates, decays, λ."""

    low: float
    high: float

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=True)

    def check(self, name: str) -> list[str]:
        problems = _check_bounds(name, self.low, self.high)
        if not problems and self.low <= 0:
            problems.append(
                f"`space.{name}` is LogFloat({self.low:g}, {self.high:g}), but a log scale needs "
                "low > 0: use a positive lower bound, or Float for a range that includes 0"
            )
        return problems

    def with_bounds(self, low: float, high: float) -> LogFloat:
        return LogFloat(low, high)

    def contains(self, value: Any) -> bool:
        return _real(value) and self.low <= value <= self.high

    def center(self) -> float:
        return math.sqrt(self.low * self.high)  # the middle on the log scale it is drawn on

    def __str__(self) -> str:
        return f"LogFloat({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class Int:
    """An integer drawn from ``low..high`` inclusive: unfreeze depth, batch size exponents."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def check(self, name: str) -> list[str]:
        problems = _check_bounds(name, self.low, self.high)
        if not problems and (int(self.low) != self.low or int(self.high) != self.high):
            problems.append(f"`space.{name}` is Int({self.low}, {self.high}): bounds must be integers")
        return problems

    def with_bounds(self, low: float, high: float) -> Int:
        return Int(int(low), int(high), self.step, self.log)

    def contains(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)

    def center(self) -> int:
        middle = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return self.low + round((middle - self.low) / self.step) * self.step

    def __str__(self) -> str:
        return f"Int({self.low}, {self.high})"


@dataclass(frozen=True)
class Categorical:
    """One of a fixed list of choices (numbers, strings, booleans or None)."""

    choices: tuple[Any, ...]

    def __init__(self, choices: Any) -> None:
        object.__setattr__(self, "choices", tuple(choices))

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def check(self, name: str) -> list[str]:
        if not self.choices:
            return [f"`space.{name}` is Categorical([]): give at least one choice"]
        bad = [c for c in self.choices if not isinstance(c, (bool, int, float, str, type(None)))]
        if bad:
            return [
                f"`space.{name}` has the choice {bad[0]!r}, but Optuna stores only None, bool, "
                "int, float and str choices"
            ]
        return []

    def contains(self, value: Any) -> bool:
        # True == 1 in Python, but a flag is not a number here.
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)

    def center(self) -> Any:
        return self.choices[0]  # choices have no middle: the first, as the study lists them

    def __str__(self) -> str:
        return f"Categorical({list(self.choices)})"


Distribution = Float | LogFloat | Int | Categorical
# A constant is any plain value: it is passed to the trial unchanged and never searched.
SpaceValue = Distribution | bool | int | float | str | None


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _on_grid(offset: float, step: float) -> bool:
    steps = offset / step
    return abs(steps - round(steps)) < 1e-9 * max(1.0, abs(steps))


def _check_bounds(name: str, low: float, high: float) -> list[str]:
    if not all(_real(v) for v in (low, high)):
        return [f"`space.{name}` has bounds ({low!r}, {high!r}): both must be finite numbers"]
    if low > high:
        return [f"`space.{name}` has low={low:g} above high={high:g}: swap them"]
    return []


def is_distribution(value: object) -> TypeGuard[Distribution]:
    return isinstance(value, (Float, LogFloat, Int, Categorical))


def sample(space: dict[str, SpaceValue], trial: optuna.Trial) -> dict[str, Any]:
    """Draw every searched value of ``space`` through ``trial``; constants pass through."""
    return {
        name: dist.suggest(trial, name) if is_distribution(dist) else dist
        for name, dist in space.items()
    }


def check(space: dict[str, SpaceValue]) -> list[str]:
    """Every problem of ``space``, as complete sentences, without stopping at the first."""
    problems: list[str] = []
    for name, dist in space.items():
        if is_distribution(dist):
            problems.extend(dist.check(name))
        elif not isinstance(dist, (bool, int, float, str, type(None))):
            problems.append(
                f"`space.{name}` is {dist!r}: use Float, LogFloat, Int, Categorical or a plain value"
            )
    return problems


CENTER = "center"  # a first trial at the middle of every searched range


def first_trial_params(space: dict[str, SpaceValue], first_trials: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The parameters of each of a study's ``first_trials``, and every problem with them.

    An entry is a dict of searched hyperparameters and their values (the sampler draws the
    ones it leaves out), or ``"center"``: the middle of every searched range (geometric for
    log scales, the first choice of a Categorical). Values must lie in their distributions:
    Optuna would use an outside value as it is, and only warn.
    """
    if isinstance(first_trials, (str, dict)) or not isinstance(first_trials, (list, tuple)):
        return [], [f"`first_trials` is {first_trials!r}: give a list of dicts of searched values, "
                    f"or [{CENTER!r}] for the middle of the space"]
    searched = {name: dist for name, dist in space.items() if is_distribution(dist)}
    points: list[dict[str, Any]] = []
    problems: list[str] = []
    for k, entry in enumerate(first_trials):
        where = f"`first_trials[{k}]`"
        if entry == CENTER:
            points.append({name: dist.center() for name, dist in searched.items()})
            continue
        if not isinstance(entry, dict) or not entry:
            problems.append(f"{where} is {entry!r}: give a dict of searched values, e.g. "
                            f"{{'learning_rate': 1e-4}}, or {CENTER!r}")
            continue
        for name, value in entry.items():
            dist = searched.get(name)
            if name not in space:
                problems.append(f"{where} sets `{name}`, which the space does not have: use "
                                f"{', '.join(searched) or 'a searched hyperparameter'}")
            elif dist is None:
                problems.append(f"{where} sets `{name}`, which the space fixes at {space[name]!r}: "
                                "leave it out (first trials set searched values only)")
            elif not dist.contains(value):
                problems.append(f"{where} sets `{name}` to {value!r}, outside `space.{name}` = {dist}: "
                                "use a value the space can draw")
        points.append(dict(entry))
    return points, problems


def parse_override(current: SpaceValue | None, text: str) -> SpaceValue:
    """Turn the text of ``--set space.NAME=TEXT`` into a new distribution or constant.

    ``low..high`` keeps the current distribution type with new bounds (a new name gets a
    Float, or a LogFloat when both bounds are positive and a decade or more apart);
    ``[a, b, ...]`` makes a Categorical; anything else is a constant.
    """
    if ".." in text and not text.startswith(("[", "'", '"')):
        low_text, high_text = text.split("..", 1)
        low, high = _number(low_text), _number(high_text)
        if isinstance(current, (Float, LogFloat, Int)):
            return current.with_bounds(low, high)
        if isinstance(low, int) and isinstance(high, int):
            return Int(low, high)
        if low > 0 and high / low >= 10:
            return LogFloat(low, high)
        return Float(low, high)
    value = literal(text)
    if isinstance(value, list):
        return Categorical(value)
    return value


def _number(text: str) -> float:
    value = literal(text.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{text.strip()!r} is not a number")
    return value


def literal(text: str) -> Any:
    """A Python literal if ``text`` is one (``3``, ``1e-4``, ``[1, 2]``, ``None``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in {"true", "false"}:
            return lowered == "true"
        if lowered in {"none", "null"}:
            return None
        return text
