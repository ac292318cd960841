"""Trial arrays (issue 21): a member of an array trains exactly as the same trial alone."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest
import torch

from sweeper.errors import SweepError
from sweeper.finetune import array_memory, loop
from sweeper.finetune.arrays import Member, MemberOutcome, Structure, TrialArray
from sweeper.finetune.loop import Hooks, Hyper, LoopSettings
from sweeper.finetune.model_specs import TinyTextClassifier
from sweeper.finetune.models import from_checkpoint
from tests.finetune.test_loop import _StopAfter  # the same stop as the loop's own tests

pytestmark = pytest.mark.xdist_group("finetune_arrays")

# Its own tiny model: the first build of a model in a process fixes the pooler every later build
# of that model gets (models._pretrained_text_weights), so sharing test_loop.py's would make
# its figures depend on which file ran first.
SPEC = TinyTextClassifier(layers=2, hidden=32, heads=4)
BATCH_SEED = 7
# Three trials of one structure that differ in everything else a member may have of its own.
HYPERS = [
    Hyper(learning_rate=2e-3, weight_decay=0.01, pretrain_loss_weight=0.5, warmup_ratio=0.1,
          adam_beta2=0.999, max_grad_norm=1.0, batch_size=16, unfreeze_depth=1, dropout=0.0),
    Hyper(learning_rate=5e-3, weight_decay=0.0, pretrain_loss_weight=0.0, warmup_ratio=0.0,
          adam_beta2=0.99, max_grad_norm=0.0, label_smoothing=0.1, batch_size=16, unfreeze_depth=1, dropout=0.0),
    Hyper(learning_rate=1e-3, weight_decay=0.1, pretrain_loss_weight=0.1, warmup_ratio=0.3,
          adam_beta2=0.98, max_grad_norm=0.5, batch_size=16, unfreeze_depth=1, dropout=0.0),
]
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def data(synthetic_data):  # type: ignore[no-untyped-def]
    return synthetic_data(240, 60)


def _settings(**kw: Any) -> LoopSettings:
    base: dict[str, Any] = dict(epochs=2, metric="accuracy", direction="maximize", device=torch.device("cpu"),
                                seed=BATCH_SEED, evals_per_epoch=2, pretrain_loss="l2sp")
    return LoopSettings(**{**base, **kw})


class _Recorder:
    """The loss of every step of ``loop.train`` (what its NaN watch is handed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.losses: list[float] = []
        original = loop._LossWatch.add

        def add(watch: Any, step: int, loss: torch.Tensor, task: torch.Tensor, extra: Any) -> None:
            self.losses.append(float(loss.detach()))
            original(watch, step, loss, task, extra)

        monkeypatch.setattr(loop._LossWatch, "add", add)


def _alone(tiny_model, data, monkeypatch, k: int, **settings: Any) -> tuple[list[float], loop.LoopResult]:  # type: ignore[no-untyped-def]
    recorder = _Recorder(monkeypatch)
    result = loop.train(tiny_model(SPEC, SEEDS[k], 0.0), data, HYPERS[k],
                        _settings(seed=SEEDS[k], batch_seed=BATCH_SEED, **settings))
    return recorder.losses, result


def _array(tiny_model, data, members: list[int], hooks: dict[int, Hooks] | None = None,  # type: ignore[no-untyped-def]
           refill: list[int] | None = None, hyper: Hyper | None = None) -> tuple[TrialArray, list[MemberOutcome]]:
    hooks = hooks or {}

    def member(k: int) -> Member:
        h = hyper or HYPERS[k]
        return Member(k, tiny_model(SPEC, SEEDS[k], h.dropout), h, SEEDS[k], hooks.get(k, Hooks()))

    array = TrialArray(data, _settings(), Structure.of(hyper or HYPERS[0], SPEC.layers), trace=True)
    for k in members:
        array.add(member(k))
    queue = list(refill or [])
    heard: list[MemberOutcome] = []
    outcomes = array.run(refill=lambda: member(queue.pop(0)) if queue else None, on_leave=heard.append)
    assert heard == outcomes  # each member was told of as it left
    return array, outcomes


def _by_key(outcomes: list[MemberOutcome]) -> dict[Any, MemberOutcome]:
    return {o.member.key: o for o in outcomes}


def _same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def alone_runs(tiny_model, data):  # type: ignore[no-untyped-def]
    runs = []
    for k in range(3):
        with pytest.MonkeyPatch.context() as monkeypatch:  # one recorder at a time
            runs.append(_alone(tiny_model, data, monkeypatch, k))
    return runs


class _PruneAt(Hooks):
    def __init__(self, evaluation: int) -> None:
        self.evaluation = evaluation

    def evaluated(self, evaluation, value, all_metrics, improved, snapshot) -> None:  # type: ignore[no-untyped-def]
        if evaluation == self.evaluation:
            raise RuntimeError("pruned")  # what optuna.TrialPruned does to a trial alone


def test_every_member_follows_its_trajectory_alone(tiny_model, data, alone_runs) -> None:  # type: ignore[no-untyped-def]
    _, outcomes = _array(tiny_model, data, [0, 1, 2])
    for k, outcome in _by_key(outcomes).items():
        losses, result = alone_runs[k]
        assert outcome.error is None and outcome.result is not None
        _same_losses(outcome.losses, losses)
        assert [e for e, _ in outcome.result.history] == [e for e, _ in result.history] == [1, 2, 3, 4]
        assert [v for _, v in outcome.result.history] == pytest.approx([v for _, v in result.history], abs=1e-9)
        assert outcome.result.best_metrics == pytest.approx(result.best_metrics, rel=1e-5)
        assert outcome.result.best_evaluation == result.best_evaluation
    # The members really differ: one array did not train three copies of one trial.
    assert len({round(o.losses[-1], 6) for o in outcomes}) == 3


def test_full_depth_members_train_their_embeddings_exactly(tiny_model, data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    hyper = replace(HYPERS[0], unfreeze_depth=None)
    losses, result = _Recorder(monkeypatch).losses, loop.train(
        tiny_model(SPEC, SEEDS[0], 0.0), data, hyper, _settings(seed=SEEDS[0], batch_seed=BATCH_SEED, epochs=1))
    array = TrialArray(data, _settings(epochs=1), Structure.of(hyper, SPEC.layers), trace=True)
    for k in (0, 1):
        array.add(Member(k, tiny_model(SPEC, SEEDS[0], 0.0), hyper, SEEDS[0]))
    for outcome in array.run():
        _same_losses(outcome.losses, losses)
        assert outcome.result is not None and outcome.result.best_metrics == pytest.approx(result.best_metrics, rel=1e-5)


def test_a_member_pruned_mid_way_leaves_at_once_and_the_others_are_unchanged(tiny_model, data, alone_runs) -> None:  # type: ignore[no-untyped-def]
    _, outcomes = _array(tiny_model, data, [0, 1, 2], hooks={1: _PruneAt(2)})
    found = _by_key(outcomes)
    pruned = found[1]
    assert isinstance(pruned.error, RuntimeError) and pruned.result is None
    steps_per_evaluation = len(alone_runs[1][0]) // 4
    assert len(pruned.losses) == 2 * steps_per_evaluation  # it computed nothing after its pruning
    _same_losses(pruned.losses, alone_runs[1][0][: len(pruned.losses)])
    for k in (0, 2):
        _same_losses(found[k].losses, alone_runs[k][0])


def test_a_member_added_mid_way_follows_its_alone_trajectory_from_where_it_joined(  # type: ignore[no-untyped-def]
        tiny_model, data, monkeypatch) -> None:
    array, outcomes = _array(tiny_model, data, [0, 1], hooks={1: _PruneAt(1)}, refill=[2])
    late = _by_key(outcomes)[2]
    assert late.batch_start > 0  # it joined the running array when member 1 left
    losses, result = _alone(tiny_model, data, monkeypatch, 2, batch_start=late.batch_start)
    _same_losses(late.losses, losses)
    assert late.result is not None
    assert [v for _, v in late.result.history] == pytest.approx([v for _, v in result.history], abs=1e-9)


def test_a_members_saved_folder_loads_with_from_pretrained_and_scores_the_same(tiny_model, data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, outcomes = _array(tiny_model, data, [0, 2])
    outcome = _by_key(outcomes)[2]
    assert outcome.result is not None
    outcome.member.save(tmp_path / "model", outcome.result.best_model)
    loaded = from_checkpoint(tmp_path / "model")  # AutoModelForSequenceClassification.from_pretrained
    scores = loop.evaluate(loaded, data.validation, torch.device("cpu"), False, data.num_labels, 16)
    assert scores == pytest.approx(outcome.result.best_metrics, rel=1e-5)


def test_a_members_resume_state_continues_alone_to_the_same_result(tiny_model, data, alone_runs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    stop = _StopAfter(2)
    _, outcomes = _array(tiny_model, data, [0, 1], hooks={0: stop})
    assert isinstance(_by_key(outcomes)[0].error, loop.Preempted) and stop.state is not None
    recorder = _Recorder(monkeypatch)
    resumed = loop.train(tiny_model(SPEC, SEEDS[0], 0.0), data, HYPERS[0],
                         _settings(seed=SEEDS[0], batch_seed=BATCH_SEED), resume=stop.state)
    losses, whole = alone_runs[0]
    _same_losses(recorder.losses, losses[stop.state.step:])
    assert [v for _, v in resumed.history] == pytest.approx([v for _, v in whole.history], abs=1e-9)
    assert resumed.best_metrics == pytest.approx(whole.best_metrics, rel=1e-5)


def test_with_dropout_members_draw_their_own_masks_and_repeat_themselves_in_any_array(tiny_model, data) -> None:  # type: ignore[no-untyped-def]
    noisy = replace(HYPERS[0], dropout=0.1, pretrain_loss_weight=0.0)
    _, together = _array(tiny_model, data, [0, 1], hyper=noisy)
    _, alone = _array(tiny_model, data, [1], hyper=noisy)
    _same_losses(_by_key(together)[1].losses, _by_key(alone)[1].losses)
    # Members 0 and 1 differ only in their seed (masks and head): their losses differ.
    assert _by_key(together)[0].losses[0] != _by_key(together)[1].losses[0]


def test_dropout_masks_differ_between_members_of_the_same_weights(tiny_model, data) -> None:  # type: ignore[no-untyped-def]
    from sweeper.finetune.array_layers import Noise

    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    rates = [0.5, 0.5]
    dropped = Noise(rates, rates, rates, generators).drop(torch.ones(2, 64), rates)
    assert not torch.equal(dropped[0], dropped[1])
    assert set(dropped.unique().tolist()) == {0.0, 2.0}


def test_a_member_of_another_structure_cannot_join(tiny_model, data) -> None:  # type: ignore[no-untyped-def]
    array = TrialArray(data, _settings(), Structure.of(HYPERS[0], SPEC.layers))
    other = replace(HYPERS[0], batch_size=8)
    with pytest.raises(SweepError, match="cannot join"):
        array.add(Member(9, tiny_model(SPEC, 0, 0.0), other, 0))


def test_an_array_too_large_for_the_device_is_made_smaller_with_one_log_line(tiny_model, caplog) -> None:  # type: ignore[no-untyped-def]
    adapter = tiny_model(SPEC, 0, 0.0)
    each = array_memory.member_bytes(adapter, 1, 16, 32)
    with caplog.at_level(logging.WARNING, logger="sweeper.finetune.array_memory"):
        fits = array_memory.fit_array_size(16, adapter, 1, 16, 32, torch.device("cpu"), budget=5 * each + 1)
    assert fits == 5
    assert len(caplog.records) == 1 and "training 5 members at a time" in caplog.records[0].message
    assert array_memory.fit_array_size(4, adapter, 1, 16, 32, torch.device("cpu"), budget=5 * each + 1) == 4
