"""Which structure a trial array trains (issue 21): every structure tried first, then the sampler.

The members of an array share its *structure* (the unfreeze depth and batch size, where the
space searches them). Left to the sampler, the first member of each array draws the structure
and every ticket that joins inherits it; since an array refills from the queue for as long as
there are tickets, a worker's array can hold one structure for a whole sweep
(``bench/array_search.py`` measured it: every trial at one depth in three sweeps of three,
and two of them stuck at the worse depth). So a :class:`StructurePlan` explores first:

- *Exploration.* While some structure of the space's grid has no trial, and less than half of
  the ticket budget has been used, a new array's first member is fixed to an untried structure
  (in an order shuffled by the study's seed, so no value is favoured), and the array takes
  members only until its structure holds ``array_size`` trials: one array's worth for each.
- *Exploitation.* After that the sampler proposes a new array's first member whole, having seen
  every structure's results (TPE weighs them like any other parameter), and the array refills
  from the queue for as long as there are tickets, as before.

Counting reads the study's trials: a trial's structure is its parameters or, before they are
drawn, the values its claim fixed; reading, choosing and claiming happen under the study's
ticket lock (:func:`claim_first`), so two workers starting arrays at once take different
structures (without it both could read the other's as untried and take the same one: seen
once on PostgreSQL under load, a sweep that never tried its second depth). Failed trials are
not counted (their retries are). A grid larger than ``MAX_GRID`` structures (or none: nothing
structural searched) leaves every choice to the sampler, as an exploration of one array each
would outlast most budgets.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, record
from sweeper import space as space_mod

STRUCTURAL = ("unfreeze_depth", "batch_size")  # what every member of an array shares
MAX_GRID = 64

Structure = tuple[Any, ...]  # the values of the searched structural parameters, in STRUCTURAL order


def fresh(trial: optuna.Trial | FrozenTrial) -> bool:
    """A ticket no one has started: not a retry, not a seed trial, nothing proposed yet."""
    return not (record.RETRY_HISTORY.get(trial) or record.REPEAT.get(trial) or trial.params)


def structural(space: dict[str, space_mod.SpaceValue]) -> tuple[str, ...]:
    """The structural parameters ``space`` searches (the others are fixed for every trial)."""
    return tuple(name for name in STRUCTURAL if space_mod.is_distribution(space.get(name)))


def _values(value: space_mod.SpaceValue) -> list[Any] | None:
    """Every value a structural search dimension can take; None if it is not a finite one."""
    if isinstance(value, space_mod.Int):
        return list(range(value.low, value.high + 1, value.step))
    if isinstance(value, space_mod.Categorical):
        return list(value.choices)
    return None


@dataclass(frozen=True)
class StructurePlan:
    """The structures of ``space``'s grid and how arrays are spread over them (module docstring)."""

    names: tuple[str, ...]
    grid: tuple[Structure, ...]  # in exploration order
    array_size: int
    n_trials: int

    @classmethod
    def of(cls, space: dict[str, space_mod.SpaceValue], array_size: int, n_trials: int,
           seed: int) -> StructurePlan | None:
        """The plan for ``space``; None when there is nothing to spread (see the docstring)."""
        names = structural(space)
        axes = [_values(space[name]) for name in names]
        if not names or any(axis is None for axis in axes):
            return None
        grid = list(itertools.product(*[axis for axis in axes if axis is not None]))
        if len(grid) < 2 or len(grid) > MAX_GRID:
            return None
        random.Random(seed).shuffle(grid)
        return cls(names, tuple(grid), array_size, n_trials)

    def structure(self, values: dict[str, Any]) -> Structure | None:
        """``values``' structure, if they hold all of it."""
        if not all(name in values for name in self.names):
            return None
        return tuple(values[name] for name in self.names)

    def tried(self, trials: Iterable[FrozenTrial]) -> Counter[Structure]:
        """Trials per structure: drawn parameters, or the values a claim fixed before the draw."""
        counts: Counter[Structure] = Counter()
        for trial in trials:
            if trial.state == TrialState.FAIL:
                continue  # its retry counts instead
            structure = self.structure({**(record.FIXED_PARAMS.get(trial, {}) or {}), **trial.params})
            if structure is not None:
                counts[structure] += 1
        return counts

    def exploring(self, counts: Counter[Structure]) -> bool:
        """Some structure is untried, and under half of the budget has been spent on the others."""
        return any(counts[s] == 0 for s in self.grid) and sum(counts.values()) < math.ceil(self.n_trials / 2)

    def first(self, trials: Iterable[FrozenTrial]) -> dict[str, Any] | None:
        """The structure to fix on a new array's first member; None: the sampler proposes it."""
        counts = self.tried(trials)
        if not self.exploring(counts):
            return None
        untried = next(s for s in self.grid if counts[s] == 0)
        return dict(zip(self.names, untried, strict=True))

    def may_join(self, trials: Iterable[FrozenTrial], fixed: dict[str, Any]) -> bool:
        """Whether an exploring array of structure ``fixed`` takes another member: until its
        structure holds one array's worth of trials."""
        structure = self.structure(fixed)
        return structure is None or self.tried(trials)[structure] < self.array_size


def claim_first(study: optuna.Study, plan: StructurePlan,
                claim: Callable[..., optuna.Trial | None]) -> tuple[optuna.Trial | None, dict[str, Any] | None]:
    """Claim a new array's first member with the structure ``plan`` has for it (None: the
    sampler proposes it); returns the trial and that structure. Under the ticket lock, so
    that the claim and its fixed values are in the storage before another worker reads."""
    with budget.ticket_lock(study):
        fixed = plan.first(study.get_trials(deepcopy=False))
        return claim(study, fixed=fixed), fixed
