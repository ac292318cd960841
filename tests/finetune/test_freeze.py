from __future__ import annotations

import pytest

from sweeper.errors import SweepError
from sweeper.finetune import freeze
from sweeper.finetune.model_specs import TinyTextClassifier


@pytest.fixture
def adapter(tiny_model):  # type: ignore[no-untyped-def]
    return tiny_model(TinyTextClassifier(layers=3, hidden=32, heads=2))


def _ids(params) -> set[int]:  # type: ignore[no-untyped-def]
    return {id(p) for p in params}


def test_unfreeze_depth_zero_trains_only_the_head(adapter) -> None:  # type: ignore[no-untyped-def]
    trainable = freeze.apply(adapter, 0)
    head = _ids(p for m in adapter.head_modules for p in m.parameters())
    assert _ids(trainable) == head
    assert not freeze.pretrained_parameters(adapter, 0)


def test_depth_d_trains_the_top_d_blocks_and_the_head(adapter) -> None:  # type: ignore[no-untyped-def]
    trainable = _ids(freeze.apply(adapter, 2))
    assert _ids(adapter.blocks[2].parameters()) <= trainable
    assert _ids(adapter.blocks[1].parameters()) <= trainable
    assert not _ids(adapter.blocks[0].parameters()) & trainable
    assert not _ids(adapter.stem.parameters()) & trainable


def test_full_depth_trains_everything_including_the_stem(adapter) -> None:  # type: ignore[no-untyped-def]
    trainable = freeze.apply(adapter, adapter.num_blocks)
    assert _ids(trainable) == _ids(adapter.parameters())


@pytest.mark.parametrize("depth", [-1, 4, 1.5, True])
def test_out_of_range_depth_is_a_clear_error(adapter, depth) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SweepError, match=r"the model has 3 blocks: use 0..3"):
        freeze.apply(adapter, depth)


def test_frozen_blocks_run_in_eval_mode(adapter) -> None:  # type: ignore[no-untyped-def]
    freeze.apply(adapter, 1)
    freeze.set_train_mode(adapter, 1)
    assert not adapter.stem.training and not adapter.blocks[0].training and not adapter.blocks[1].training
    assert adapter.blocks[2].training and all(m.training for m in adapter.head_modules)
