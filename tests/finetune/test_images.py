"""The CNN path: an image folder, a torchvision ResNet, the same loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper.errors import SweepError
from sweeper.finetune.data import ImageData, check_source, prepare
from sweeper.finetune.loop import Hyper, LoopSettings, train
from sweeper.finetune.model_specs import ImageClassifier


def test_a_resnet_fine_tunes_on_an_image_folder(tmp_path: Path, image_folder) -> None:  # type: ignore[no-untyped-def]
    folder = image_folder(40)
    spec = ImageData(str(folder), image_size=32, augment=True, validation_fraction=0.25)
    check_source(spec)
    data = prepare(spec, tmp_path / "cache", seed=0)
    assert data.sizes() == {"train": 60, "validation": 20, "test": 20}
    assert data.label_names == ["blue", "red"]
    batch = data.train.batch(np.arange(4), torch.device("cpu"))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    torch.manual_seed(0)
    adapter = ImageClassifier("resnet18", weights="none").build(data.num_labels, tmp_path)
    settings = LoopSettings(epochs=3, metric="accuracy", direction="maximize", device=torch.device("cpu"),
                            seed=0, pretrain_loss="l2sp")
    result = train(adapter, data, Hyper(learning_rate=1e-3, batch_size=20, unfreeze_depth=2,
                                        pretrain_loss_weight=0.1), settings)
    assert len(result.history) == 3
    assert result.best_value >= 0.8  # colour is easy; chance is 0.5


def test_an_image_folder_without_a_test_split_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SweepError, match="has no test/ folder"):
        check_source(ImageData(str(tmp_path / "images")))
