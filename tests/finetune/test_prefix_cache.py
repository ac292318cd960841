"""The frozen-prefix cache gives what the plain path gives (issue 7).

No timings here: only that the fast path computes the same thing as the plain one, within
the float tolerance each test states, and that it is used (or bypassed) where it should be.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from sweeper.finetune import freeze, prefix
from sweeper.finetune.data import ImageSplit, PreparedData, evaluation_batches, training_batches
from sweeper.finetune.loop import Hyper, LoopSettings, forward_pass, train
from sweeper.finetune.model_specs import TinyTextClassifier

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("prefix_cache")

SPEC = TinyTextClassifier(layers=3, hidden=32, heads=2)


@pytest.fixture(autouse=True)
def _fresh_stores() -> Iterator[None]:
    prefix.clear()
    yield
    prefix.clear()


@pytest.fixture(scope="module")
def data(synthetic_data):  # type: ignore[no-untyped-def]
    return synthetic_data(400, 50)


def _settings(**kw) -> LoopSettings:  # type: ignore[no-untyped-def]
    base = dict(epochs=2, metric="accuracy", direction="maximize", device=torch.device("cpu"), seed=3,
                evals_per_epoch=2, pretrain_loss="l2sp")
    return LoopSettings(**{**base, **kw})


def _fresh_prefix(adapter, batch, start):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        hidden, context = adapter.embed(batch)
        return adapter.run(hidden, context, adapter.blocks[:start])


@pytest.mark.parametrize(("dtype", "tolerance"), [
    (torch.float32, 1e-5),  # fp32 storage: only the float rounding of another batch shape
    (torch.bfloat16, 2**-7),  # bf16 storage: 8 significant bits, relative rounding up to 2^-8
])
def test_cached_prefix_features_equal_a_fresh_forward_pass(data, tiny_model, dtype, tolerance) -> None:  # type: ignore[no-untyped-def]
    adapter = tiny_model(SPEC)
    start = freeze.first_trainable_block(1, adapter.num_blocks)
    freeze.apply(adapter, 1)
    adapter.eval()
    store = prefix.FeatureStore(data.train, tokens=True, dtype=dtype, device=torch.device("cpu"))
    fill = training_batches(data.train.lengths(), 16, seed=0)
    for indices in fill:  # filled by the batches of one epoch ...
        forward_pass(adapter, data.train.batch(indices, torch.device("cpu")), start, indices=indices, store=store)
    assert store.filled.all() and store.stores == len(fill)
    for indices in evaluation_batches(data.train.lengths(), 48):  # ... read back in other batches
        batch = data.train.batch(indices, torch.device("cpu"))
        assert store.has(indices)
        cached, fresh = store.gather(indices), _fresh_prefix(adapter, batch, start)
        real = batch["attention_mask"].bool()
        assert cached.dtype == fresh.dtype == torch.float32
        torch.testing.assert_close(cached[real], fresh[real], rtol=tolerance, atol=tolerance)
        assert not cached[~real].any()  # padding is zero, and hidden from real tokens by the mask


def test_logits_from_the_cache_equal_the_plain_forward_pass(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    adapter = tiny_model(SPEC)
    freeze.apply(adapter, 2)
    adapter.eval()
    store = prefix.FeatureStore(data.validation, tokens=True, dtype=torch.float32, device=torch.device("cpu"))
    indices = np.arange(len(data.validation))
    batch = data.validation.batch(indices, torch.device("cpu"))
    with torch.no_grad():
        plain = adapter(batch)
        first, _ = forward_pass(adapter, batch, 1, indices=indices, store=store)
        second, _ = forward_pass(adapter, batch, 1, indices=indices, store=store)
    assert store.hits == 1
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pretrain_loss", ["l2sp", "distill", "mlm"])
def test_a_trial_with_the_cache_trains_like_one_without(data, tiny_model, model_cache, pretrain_loss) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=3e-3, batch_size=16, unfreeze_depth=1, pretrain_loss_weight=0.3)
    plain_model, cached_model = tiny_model(SPEC), tiny_model(SPEC)
    extra = {}
    if pretrain_loss == "mlm":  # its masked pass runs the frozen bottom itself: masks change every step
        extra = dict(lm_head=SPEC.pretrained_lm_head(model_cache), tokenizer=SPEC.tokenizer(model_cache))
    plain = train(plain_model, data, hyper, _settings(pretrain_loss=pretrain_loss, cache_prefix=False), **extra)
    assert not prefix.cached_stores()
    cached = train(cached_model, data, hyper, _settings(pretrain_loss=pretrain_loss), **extra)
    stores = prefix.cached_stores()
    assert stores and all(s.hits > 0 for s in stores)  # the later epochs and evaluations read it
    # fp32 on a CPU: the cached prefix differs from a fresh one only by the rounding of
    # another batch shape (about 1e-7), which 50 steps of AdamW do not amplify past 1e-4.
    assert [e for e, _ in cached.history] == [e for e, _ in plain.history]
    for (_, a), (_, b) in zip(cached.history, plain.history):
        assert a == pytest.approx(b, abs=1.5 / len(data.validation))  # at most one example flips
    for (name, a), (_, b) in zip(cached_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_full_depth_bypasses_the_prefix_cache(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=3e-3, batch_size=16, unfreeze_depth=SPEC.layers, pretrain_loss_weight=0.3)
    cached_model, plain_model = tiny_model(SPEC), tiny_model(SPEC)
    cached = train(cached_model, data, hyper, _settings(epochs=1))
    assert not prefix.cached_stores()  # nothing is frozen, so nothing is stored
    plain = train(plain_model, data, hyper, _settings(epochs=1, cache_prefix=False))
    assert cached.history == plain.history
    for a, b in zip(cached_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_full_depth_distill_caches_only_the_teacher(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=3e-3, batch_size=16, unfreeze_depth=SPEC.layers, pretrain_loss_weight=0.5)
    cached_model, plain_model = tiny_model(SPEC), tiny_model(SPEC)
    train(cached_model, data, hyper, _settings(pretrain_loss="distill"))
    kinds = [s for s in prefix.cached_stores() if not s.tokens]
    assert len(prefix.cached_stores()) == 1 and kinds and kinds[0].hits > 0
    train(plain_model, data, hyper, _settings(pretrain_loss="distill", cache_prefix=False))
    for (name, a), (_, b) in zip(cached_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_a_later_trial_reuses_the_stores_of_an_earlier_one(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=1e-3, batch_size=32, unfreeze_depth=1)
    train(tiny_model(SPEC), data, hyper, _settings(epochs=1))
    store_train = max(prefix.cached_stores(), key=lambda s: len(s.split))
    stored = store_train.stores
    # Another head seed, learning rate and dropout: the frozen bottom is the same.
    train(tiny_model(SPEC, seed=1), data, Hyper(learning_rate=3e-3, batch_size=16, unfreeze_depth=1, dropout=0.2),
          _settings(epochs=1))
    assert len(prefix.cached_stores()) == 2 and store_train.stores == stored
    # Another start block is another prefix: a new store, never the old values.
    train(tiny_model(SPEC), data, Hyper(learning_rate=1e-3, batch_size=32, unfreeze_depth=2), _settings(epochs=1))
    assert len(prefix.cached_stores()) == 4


def test_other_weights_get_other_stores(data, tiny_model, model_cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=1e-3, batch_size=32, unfreeze_depth=1)
    train(tiny_model(SPEC), data, hyper, _settings(epochs=1))
    other = TinyTextClassifier(layers=3, hidden=32, heads=2, seed=5)
    train(other.build(2, model_cache), data, hyper, _settings(epochs=1))
    assert len(prefix.cached_stores()) == 4


def test_a_cache_over_its_budget_runs_the_plain_path(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=3e-3, batch_size=16, unfreeze_depth=1)
    small, plain_model = tiny_model(SPEC), tiny_model(SPEC)
    result = train(small, data, hyper, _settings(epochs=1, prefix_cache_gib=1e-9))
    assert all(s.disabled and s.hits == 0 for s in prefix.cached_stores())
    plain = train(plain_model, data, hyper, _settings(epochs=1, cache_prefix=False))
    assert result.history == plain.history
    for a, b in zip(small.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_the_lru_evicts_the_oldest_store_not_in_use() -> None:
    budget = prefix._Budget()
    budget.limit = 1000
    split = ImageSplit(np.zeros((10, 2, 2, 3), dtype=np.uint8), np.zeros(10, dtype=np.int64))
    old = budget.get(("a",), lambda: prefix.FeatureStore(split, False, torch.float32, torch.device("cpu"), budget))
    old.store(np.arange(10), torch.ones(10, 20))  # 800 bytes
    budget.release()
    new = budget.get(("b",), lambda: prefix.FeatureStore(split, False, torch.float32, torch.device("cpu"), budget))
    new.store(np.arange(10), torch.ones(10, 20))
    assert list(budget.stores) == [("b",)] and new.has(np.arange(10))
    third = budget.get(("c",), lambda: prefix.FeatureStore(split, False, torch.float32, torch.device("cpu"), budget))
    third.store(np.arange(10), torch.ones(10, 20))  # "b" is in use by this trial: not evicted
    assert third.disabled and new.has(np.arange(10))


def test_augmented_images_are_not_cached_but_their_validation_is(model_cache) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torchvision")
    from sweeper.finetune.model_specs import ImageClassifier

    rng = np.random.default_rng(0)

    def split(n: int, augment: bool) -> ImageSplit:
        return ImageSplit(rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), rng.integers(0, 2, n), augment)

    data = PreparedData(split(24, True), split(8, False), split(8, False), 2)
    torch.manual_seed(0)
    adapter = ImageClassifier("resnet18", weights="none").build(2, model_cache)
    train(adapter, data, Hyper(learning_rate=1e-3, batch_size=8, unfreeze_depth=2),
          _settings(epochs=1, evals_per_epoch=1))
    stores = prefix.cached_stores()
    assert [len(s.split) for s in stores] == [8] and stores[0].values is not None
    assert stores[0].values.shape[1:] == (256, 1, 1)  # the feature map below the top two blocks
