"""Weight soups: one model averaged from the kept trials of a sweep.

A sweep trains many models from the same pretrained weights and keeps the best ``k``. Model
soups (Wortsman et al., ICML 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time") average their weights instead
of keeping one: the *uniform* soup averages every ingredient, the *greedy* soup adds trials
in order of validation score and keeps each only if the average's validation score does not
drop. Averaging works when the models lie in one basin: the same pretrained weights, and in
the paper the same initial head, a linear probe (the study settings ``head_init="probe"``, or
``"shared"``: one random draw). A frozen block is the pretrained block in every trial, so
trials of different unfreeze depths average fine.

This module knows nothing of storages or artifact stores: it averages state dicts, scores
them with a function it is handed, and recomputes BatchNorm statistics. ``best.py`` fetches
the members, writes the folder and records the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from optuna.study import StudyDirection
from torch import nn

from sweeper import record
from sweeper.errors import SweepError

logger = logging.getLogger(__name__)

METHODS = ("greedy", "uniform")
BATCHNORM_EXAMPLES = 4096  # training examples that re-estimate BatchNorm statistics after averaging
BATCHNORM_BATCH = 64  # examples per batch of that pass

State = dict[str, torch.Tensor]
Score = Callable[[State], dict[str, float]]  # every validation metric of a state dict
Blend = Callable[[Sequence[State]], State]  # the soup of some states: `average`, or it and BatchNorm


@dataclass
class Ingredient:
    """One kept trial: its number, its validation value, and its weights."""

    trial: int
    value: float
    state: State


@dataclass
class Step:
    """One step of the greedy pass: the soup with ``trial`` added scored ``value``."""

    trial: int
    value: float
    kept: bool

    def as_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "validation": self.value, "kept": self.kept}


@dataclass
class Soup:
    method: str
    members: list[int]  # trials whose weights are in it, best first
    state: State
    validation: dict[str, float]  # every metric, on the study's validation split
    steps: list[Step] = field(default_factory=list)

    @property
    def weights(self) -> list[float]:
        return [1.0 / len(self.members)] * len(self.members)


# --------------------------------------------------------------------------- averaging


def signature(state: State) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What must agree for two state dicts to be averaged: names, shapes and types."""
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def check_averageable(ingredients: Sequence[Ingredient]) -> None:
    """Refuse, in one line, ingredients whose weights do not line up with the first's."""
    first = ingredients[0]
    reference = signature(first.state)
    odd: list[str] = []
    for other in ingredients[1:]:
        theirs = signature(other.state)
        missing = sorted(set(reference) ^ set(theirs))
        shaped = sorted(k for k in set(reference) & set(theirs) if reference[k] != theirs[k])
        if missing:
            odd.append(f"trial {other.trial} differs in {len(missing)} weight names (e.g. {missing[0]})")
        elif shaped:
            name = shaped[0]
            odd.append(f"trial {other.trial} has {name} of shape {list(theirs[name][0])}, "
                       f"not {list(reference[name][0])}")
    if odd:
        raise SweepError(f"the kept trials cannot be averaged: they hold different models (beside the best "
                         f"trial {first.trial}, {'; '.join(odd)}): export one of them with `sweeper best "
                         "--trial N`, or soup a sweep of one model")


def average(states: Sequence[State]) -> State:
    """The uniform mean of ``states``: each float weight summed in float64 and rounded once to
    its own type, so the soup of one model is that model to the last bit. Integer buffers
    (position ids, BatchNorm's batch counters) are not weights: the first state's are kept."""
    if not states:
        raise ValueError("average of no state dicts")
    soup: State = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            total = torch.zeros(first.shape, dtype=torch.float64)
            for state in states:
                total += state[name].detach().to("cpu", torch.float64)
            soup[name] = (total / len(states)).to(first.dtype)
        else:
            soup[name] = first.detach().cpu().clone()
    return soup


# --------------------------------------------------------------------------- the two soups


def uniform(ingredients: Sequence[Ingredient], score: Score, blend: Blend = average) -> Soup:
    """Every ingredient, averaged once."""
    check_averageable(ingredients)
    state = blend([i.state for i in ingredients])
    scores = score(state)
    return Soup("uniform", [i.trial for i in ingredients], state, scores)


def greedy(ingredients: Sequence[Ingredient], score: Score, metric: str, direction: StudyDirection,
           blend: Blend = average) -> Soup:
    """Wortsman et al.'s greedy soup: ingredients in order of validation value, best first;
    each stays only if the soup's validation figure does not drop with it (a tie keeps it,
    as in the paper's ``>=``)."""
    check_averageable(ingredients)
    order = sorted(ingredients, key=lambda i: i.value, reverse=direction == StudyDirection.MAXIMIZE)
    kept = [order[0]]
    state = blend([order[0].state])
    scores = score(state)
    steps = [Step(order[0].trial, scores[metric], True)]
    for candidate in order[1:]:
        trial_state = blend([i.state for i in (*kept, candidate)])
        trial_scores = score(trial_state)
        keep = not record.better(scores[metric], trial_scores[metric], direction)
        steps.append(Step(candidate.trial, trial_scores[metric], keep))
        logger.info("greedy soup: with trial %d, %s %.4f (%s)", candidate.trial, metric,
                    trial_scores[metric], "kept" if keep else "left out")
        if keep:
            kept.append(candidate)
            state, scores = trial_state, trial_scores
    return Soup("greedy", [i.trial for i in kept], state, scores, steps)


def make(method: str, ingredients: Sequence[Ingredient], score: Score, metric: str,
         direction: StudyDirection, blend: Blend = average) -> Soup:
    if method not in METHODS:
        raise SweepError(f"`--soup {method}` is not a soup: use {' or '.join(METHODS)}")
    if not ingredients:
        raise SweepError("no kept trial to make a soup of: wait for a trial to finish")
    if method == "uniform":
        return uniform(ingredients, score, blend)
    return greedy(ingredients, score, metric, direction, blend)


# --------------------------------------------------------------------------- BatchNorm


def batchnorm_to_recompute(model: nn.Module, states: Sequence[State]) -> list[str]:
    """BatchNorm layers whose running statistics differ between the members: those trained in
    some trial. Their average is not the statistics of the averaged weights; a frozen
    layer's (the same in every member) stays as it is."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            key = f"{name}.running_mean"
            if any(not torch.equal(s[key], states[0][key]) for s in states[1:]):
                names.append(name)
    return names


@torch.no_grad()
def recompute_batchnorm(adapter: Any, layers: Sequence[str], batches: Callable[[], Any]) -> None:
    """Re-estimate the running statistics of ``layers`` of ``adapter.model`` on training
    batches (as the paper does for its ResNet soups): reset, then a cumulative average
    (``momentum=None``) over every batch of ``batches()``, every other layer in evaluation mode."""
    if not layers:
        return
    wanted = set(layers)
    chosen = {name: module for name, module in adapter.model.named_modules() if name in wanted}
    adapter.eval()
    saved = {}
    for name, module in chosen.items():
        saved[name] = module.momentum
        module.reset_running_stats()
        module.momentum = None
        module.train()
    try:
        for batch in batches():
            adapter(batch)
    finally:
        for name, module in chosen.items():
            module.momentum = saved[name]
        adapter.eval()


def training_batches(split: Any, device: torch.device, seed: int,
                     examples: int = BATCHNORM_EXAMPLES) -> Callable[[], Any]:
    """Seeded batches of up to ``examples`` training examples, for :func:`recompute_batchnorm`."""
    def batches() -> Any:
        order = np.random.default_rng(seed).permutation(len(split))[:examples]
        for start in range(0, len(order), BATCHNORM_BATCH):
            yield split.batch(order[start:start + BATCHNORM_BATCH], device)
    return batches


def batchnorm_blend(adapter: Any, batches: Callable[[], Any]) -> Blend:
    """:func:`average`, then the BatchNorm statistics that differ between the averaged states
    recomputed on training batches with ``adapter`` (which it leaves holding the soup)."""
    def blend(states: Sequence[State]) -> State:
        state = average(states)
        layers = batchnorm_to_recompute(adapter.model, states)
        if not layers:
            return state
        adapter.model.load_state_dict(state)
        recompute_batchnorm(adapter, layers, batches)
        return {name: t.detach().cpu().clone() for name, t in adapter.model.state_dict().items()}
    return blend
