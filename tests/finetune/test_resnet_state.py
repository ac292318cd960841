"""A ResNet's BatchNorm statistics travel with its trained weights: a resumed trial continues
bit for bit, and the best model evaluates as it did at its best evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweeper.finetune.data import ImageData, prepare
from sweeper.finetune.loop import Hyper, LoopSettings, Preempted, evaluate, load_trained, train
from sweeper.finetune.model_specs import ImageClassifier
from tests.finetune.test_loop import _StopAfter

HYPER = Hyper(learning_rate=3e-3, batch_size=10, unfreeze_depth=2, pretrain_loss_weight=0.1)


@pytest.fixture(scope="module")
def images(image_folder, tmp_path_factory):  # type: ignore[no-untyped-def]
    spec = ImageData(str(image_folder(40)), image_size=32, augment=False, validation_fraction=0.25)
    return prepare(spec, tmp_path_factory.mktemp("cache"), seed=0)


def _resnet(tmp_path: Path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return ImageClassifier("resnet18", weights="none").build(2, tmp_path)


def _settings() -> LoopSettings:
    return LoopSettings(epochs=3, metric="accuracy", direction="maximize", device=torch.device("cpu"), seed=1,
                        evals_per_epoch=2, pretrain_loss="l2sp")


def test_a_resumed_resnet_continues_with_its_batchnorm_statistics(tmp_path: Path, images) -> None:  # type: ignore[no-untyped-def]
    whole = _resnet(tmp_path)
    full = train(whole, images, HYPER, _settings())
    first = _resnet(tmp_path)
    hooks = _StopAfter(2)
    with pytest.raises(Preempted):
        train(first, images, HYPER, _settings(), hooks)
    assert hooks.state is not None
    assert any("running_mean" in name for name in hooks.state.model), "the state carries the statistics"
    resumed = train(_resnet(tmp_path), images, HYPER, _settings(), resume=hooks.state)
    assert [v for _, v in resumed.history] == pytest.approx([v for _, v in full.history], abs=1e-6)
    assert resumed.best_value == pytest.approx(full.best_value)


def test_the_best_model_scores_what_its_best_evaluation_scored(tmp_path: Path, images) -> None:  # type: ignore[no-untyped-def]
    adapter = _resnet(tmp_path)
    result = train(adapter, images, HYPER, _settings())
    assert any("running_var" in name for name in result.best_model)
    load_trained(adapter, result.best_model)
    again = evaluate(adapter, images.validation, torch.device("cpu"), False, images.num_labels, 64)
    assert again["accuracy"] == pytest.approx(result.best_value)
    assert again["loss"] == pytest.approx(result.best_metrics["loss"], rel=1e-5)
