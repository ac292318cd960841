"""Trial arrays of ResNets (issue 21): grouped convolutions and per-member BatchNorm statistics
train each member exactly as the same trial alone.

The trajectories are compared in float64. In float32 a grouped convolution sums in another
order than the same convolution alone, and Adam, which divides every element's gradient by
its own size, turns those last-bit differences of small gradient elements into visible ones
within a few steps (float64 leaves them below 1e-9 over a whole run: the math is the same).
So in float32 the tests hold the first step, which nothing has amplified yet, to 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sweeper.finetune import array_memory, loop
from sweeper.finetune.arrays import Member, MemberOutcome, Structure, TrialArray
from sweeper.finetune.data import ImageData, _splits, prepare
from sweeper.finetune.loop import Hooks, Hyper, LoopSettings
from sweeper.finetune.model_specs import ImageClassifier
from sweeper.finetune.models import from_checkpoint
from tests.finetune.test_arrays import _PruneAt, _Recorder, _same_losses

pytestmark = pytest.mark.xdist_group("finetune_arrays")

BATCH_SEED = 11
SEEDS = [21, 22, 23]


def _hypers(depth: int) -> list[Hyper]:
    return [
        Hyper(learning_rate=3e-3, weight_decay=0.01, pretrain_loss_weight=0.2, warmup_ratio=0.1, batch_size=10,
              unfreeze_depth=depth),
        Hyper(learning_rate=1e-3, weight_decay=0.0, pretrain_loss_weight=0.0, label_smoothing=0.1, adam_beta2=0.99,
              max_grad_norm=0.0, batch_size=10, unfreeze_depth=depth),
        Hyper(learning_rate=5e-3, weight_decay=0.1, pretrain_loss_weight=0.05, max_grad_norm=0.5, batch_size=10,
              unfreeze_depth=depth),
    ]


DOUBLE = {"on": True}  # the module's tests train in float64 unless one says otherwise


@pytest.fixture(scope="module")
def images(image_folder, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Images with augmentation on (the array draws one augmented batch for all its members),
    handed out in float64 while ``DOUBLE`` says so."""
    spec = ImageData(str(image_folder(40)), image_size=32, augment=True, validation_fraction=0.25)
    data = prepare(spec, tmp_path_factory.mktemp("cache"), seed=0)
    single = _splits.ImageSplit.batch

    def batch(split: Any, indices: Any, device: torch.device) -> dict[str, torch.Tensor]:
        made = single(split, indices, device)
        return {k: v.double() if DOUBLE["on"] and v.is_floating_point() else v for k, v in made.items()}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_splits.ImageSplit, "batch", batch)
        yield data


def _resnet(seed: int, folder: Path):  # type: ignore[no-untyped-def]
    """ResNet-18 with one set of "pretrained" weights (seed 0) and a head drawn from ``seed``."""
    torch.manual_seed(0)
    adapter = ImageClassifier("resnet18", weights="none").build(2, folder)
    torch.manual_seed(seed)
    adapter.model.fc.reset_parameters()
    if DOUBLE["on"]:
        adapter.model.double()
    return adapter


def _settings(**kw: Any) -> LoopSettings:
    # float64 features would be cached in float32 (prefix.py): the exactness runs do not cache.
    base: dict[str, Any] = dict(epochs=2, metric="accuracy", direction="maximize", device=torch.device("cpu"),
                                seed=BATCH_SEED, evals_per_epoch=2, pretrain_loss="l2sp",
                                cache_prefix=not DOUBLE["on"])
    return LoopSettings(**{**base, **kw})


def _alone(images, tmp_path: Path, monkeypatch, hyper: Hyper, k: int, batch_start: int = 0):  # type: ignore[no-untyped-def]
    recorder = _Recorder(monkeypatch)
    result = loop.train(_resnet(SEEDS[k], tmp_path), images, hyper,
                        _settings(seed=SEEDS[k], batch_seed=BATCH_SEED, batch_start=batch_start))
    return recorder.losses, result


def _array(images, tmp_path: Path, hypers: list[Hyper], members: list[int], hooks: dict[int, Hooks] | None = None,  # type: ignore[no-untyped-def]
           refill: list[int] | None = None) -> tuple[TrialArray, list[MemberOutcome]]:
    hooks = hooks or {}

    def member(k: int) -> Member:
        return Member(k, _resnet(SEEDS[k], tmp_path), hypers[k], SEEDS[k], hooks.get(k, Hooks()))

    array = TrialArray(images, _settings(), Structure.of(hypers[0], 8), trace=True)
    for k in members:
        array.add(member(k))
    queue = list(refill or [])
    outcomes = array.run(refill=lambda: member(queue.pop(0)) if queue else None)
    return array, outcomes


@pytest.mark.parametrize("depth", [pytest.param(2, marks=pytest.mark.long), 0, pytest.param(8, marks=pytest.mark.long)],
                         ids=["top-two-blocks", "linear-probe", "full-depth"])  # 40 s each: CI's long run
def test_every_resnet_member_follows_its_trajectory_alone(images, tmp_path: Path, monkeypatch, depth: int) -> None:  # type: ignore[no-untyped-def]
    hypers = _hypers(depth)
    _, outcomes = _array(images, tmp_path, hypers, [0, 1, 2])
    for outcome in outcomes:
        k = int(outcome.member.key)
        with pytest.MonkeyPatch.context() as patch:
            losses, result = _alone(images, tmp_path, patch, hypers[k], k)
        assert outcome.error is None and outcome.result is not None
        _same_losses(outcome.losses, losses)
        assert [v for _, v in outcome.result.history] == pytest.approx([v for _, v in result.history], abs=1e-6)
        for name, value in result.best_model.items():  # the weights and the BatchNorm statistics
            torch.testing.assert_close(outcome.result.best_model[name].float(), value.float(), rtol=1e-4, atol=1e-5,
                                       msg=name)


@pytest.mark.long
def test_a_pruned_resnet_member_leaves_and_a_refill_sees_the_batches_from_where_it_joined(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hypers = _hypers(2)
    array, outcomes = _array(images, tmp_path, hypers, [0, 1], hooks={1: _PruneAt(1)}, refill=[2])
    by_key = {o.member.key: o for o in outcomes}
    assert isinstance(by_key[1].error, RuntimeError)
    assert by_key[2].batch_start > 0, "the refill joined mid-way, in the pruned member's place"
    with pytest.MonkeyPatch.context() as patch:
        losses, result = _alone(images, tmp_path, patch, hypers[2], 2, batch_start=by_key[2].batch_start)
    _same_losses(by_key[2].losses, losses)
    assert by_key[2].result is not None and by_key[2].result.best_value == pytest.approx(result.best_value)


def test_in_float32_the_first_step_of_every_member_is_the_trial_alone_s(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    DOUBLE["on"] = False
    try:
        hypers = _hypers(2)
        _, outcomes = _array(images, tmp_path, hypers, [0, 1, 2])
        for outcome in outcomes:
            k = int(outcome.member.key)
            with pytest.MonkeyPatch.context() as patch:
                losses, _ = _alone(images, tmp_path, patch, hypers[k], k)
            assert outcome.losses[0] == pytest.approx(losses[0], rel=1e-5)
            # Later steps part at float32's last bits, amplified (the module's docstring), not more.
            assert outcome.losses[-1] == pytest.approx(losses[-1], rel=0.5, abs=0.05)
    finally:
        DOUBLE["on"] = True


def test_a_resnet_member_saves_a_checkpoint_that_loads_and_scores_the_same(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hypers = _hypers(2)
    _, outcomes = _array(images, tmp_path, hypers, [0, 2])
    outcome = outcomes[0]
    assert outcome.result is not None
    folder = tmp_path / "member"
    outcome.member.save(folder, outcome.result.best_model)
    loaded = from_checkpoint(folder)
    loaded.model.double()
    scores = loop.evaluate(loaded, images.validation, torch.device("cpu"), False, images.num_labels, 64)
    assert scores["accuracy"] == pytest.approx(outcome.result.best_value)
    assert scores["loss"] == pytest.approx(outcome.result.best_metrics["loss"], rel=1e-4)


def test_the_memory_estimate_of_a_resnet_member_bounds_the_array(tmp_path: Path) -> None:
    adapter = _resnet(0, tmp_path)
    each = array_memory.member_bytes(adapter, 2, 32, 32)
    assert each > 4 * 6 * sum(p.numel() for p in adapter.model.layer4.parameters())
    assert array_memory.fit_array_size(16, adapter, 2, 32, 32, torch.device("cpu"), budget=3 * each) == 3
