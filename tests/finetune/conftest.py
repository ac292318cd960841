"""What the fine-tuning tests share: tiny models, tiny data, a tiny image folder and MiniLM's
tokenizer, each built once for the whole run where no test changes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper.finetune.data import PreparedData, SyntheticText, prepare
from sweeper.finetune.model_specs import TextClassifier, TinyTextClassifier
from sweeper.finetune.models import TextAdapter
from tests.helpers import MINILM


@pytest.fixture(scope="session")
def tiny_model(model_cache: Path) -> Callable[..., TextAdapter]:
    """``tiny_model(spec, seed=0, dropout=None)``: a fresh two-label adapter of the tiny model
    ``spec``, its new head drawn after ``torch.manual_seed(seed)``."""

    def build(spec: TinyTextClassifier, seed: int = 0, dropout: float | None = None) -> TextAdapter:
        torch.manual_seed(seed)
        return spec.build(2, model_cache, dropout)

    return build


@pytest.fixture(scope="session")
def synthetic_data(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], PreparedData]:
    """``synthetic_data(n_train, n_test)``: the generated sentiment task tokenised for the tiny
    models (every one has the same vocabulary), prepared once per size."""
    folder = tmp_path_factory.mktemp("synthetic")
    tokenizer = TinyTextClassifier(layers=2, hidden=32, heads=2).tokenizer(model_cache)
    prepared: dict[tuple[int, int], PreparedData] = {}

    def make(n_train: int, n_test: int) -> PreparedData:
        if (n_train, n_test) not in prepared:
            spec = SyntheticText(n_train=n_train, n_test=n_test)
            prepared[n_train, n_test] = prepare(spec, folder, 0, tokenizer, "tiny-bert")
        return prepared[n_train, n_test]

    return make


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``image_folder(per_class)``: an image folder of two classes a CNN can tell apart,
    reddish and bluish noise, with ``per_class`` training and a quarter as many test images
    of each."""
    made: dict[int, Path] = {}

    def make(per_class: int) -> Path:
        if per_class not in made:
            made[per_class] = _image_folder(tmp_path_factory.mktemp("images"), per_class)
        return made[per_class]

    return make


def _image_folder(root: Path, per_class: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 4)):
        for name, channel in (("red", 0), ("blue", 2)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, size=(40, 40, 3), dtype=np.uint8)
                pixels[..., channel] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def minilm_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tokenizer of the real MiniLM in ../shared."""
    return TextClassifier(str(MINILM)).tokenizer(tmp_path_factory.mktemp("tok"))
