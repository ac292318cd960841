"""What a study file names as its ``model``: :class:`TextClassifier` (Hugging Face BERT-family
encoders), :class:`ImageClassifier` (torchvision ResNets) and :class:`TinyTextClassifier` (a
small random BERT built on the spot, for the quickstart and tests).

A spec is settings and the questions about them that need no weights; building a model is
``models.py``'s, imported only when one is built. So loading and checking a study file
(``sweeper validate``, ``status``, ``report``) never waits for PyTorch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from filelock import FileLock

from sweeper.errors import ModelNotLoaded
from sweeper.finetune import rules

if TYPE_CHECKING:
    from torch import nn

    from sweeper.finetune.models import ModelAdapter, ResNetAdapter, TextAdapter


def _models() -> ModuleType:
    """``models.py``, imported when a model is first built (it imports PyTorch)."""
    from sweeper.finetune import models

    return models


# Residual blocks per torchvision ResNet: the sum of its four stages' block counts.
RESNET_BLOCKS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50}
RESNETS = tuple(RESNET_BLOCKS)


class BaseModelSpec:
    """What a study's ``model`` answers; each kind of model is one subclass (and one member
    of :data:`ModelSpec`), and nothing outside it asks which kind it is.

    Its settings are dataclass fields declared with :func:`rules.setting`, which
    :meth:`check` reads.
    """

    kind: ClassVar[str]  # "text" or "image": the kind of data it pairs with

    @property
    def path(self) -> str:
        """What the model is loaded from, as messages and the CLI show it."""
        raise NotImplementedError

    def check(self) -> list[str]:
        """Every problem of the settings, without loading anything."""
        return rules.problems(self, prefix="model.")

    def identity(self) -> str:
        """A name for cache keys that changes when the model does."""
        return self.path

    def num_blocks(self, cache_dir: Path) -> int:
        """Blocks of the model, without loading its weights."""
        raise NotImplementedError

    def tokenizer(self, cache_dir: Path) -> Any:
        """The tokenizer its data is prepared with; None for a model that reads no text."""
        return None

    def build(self, num_labels: int, cache_dir: Path, dropout: float | None = None,
              label_names: Sequence[str] = ()) -> ModelAdapter:
        """The pretrained model with a new head of ``num_labels``, as an adapter; the saved
        model names its classes ``label_names`` (where there is one per class)."""
        raise NotImplementedError

    def has_lm_head(self, cache_dir: Path) -> bool:
        """Whether the checkpoint has the masked-LM head ``pretrain_loss='mlm'`` needs."""
        return False

    def with_path(self, text: str) -> ModelSpec:
        """The model ``--set model=TEXT`` names instead of this one."""
        raise NotImplementedError


@dataclass
class TextClassifier(BaseModelSpec):
    """A BERT-family encoder from the Hugging Face hub or a local folder, with a new head."""

    path: str = rules.setting("bert-base-uncased", "a hub name or a local model folder (config.json, weights)")

    kind = "text"

    def identity(self) -> str:
        return folder_identity(self.path)

    def num_blocks(self, cache_dir: Path) -> int:
        """Blocks of the model, read from its config alone (no weights are loaded)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ModelNotLoaded(self.path, exc) from None
        return int(config.num_hidden_layers)

    def tokenizer(self, cache_dir: Path) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ModelNotLoaded(self.path, exc) from None

    def build(self, num_labels: int, cache_dir: Path, dropout: float | None = None,
              label_names: Sequence[str] = ()) -> TextAdapter:
        return _models().text_adapter(self.path, num_labels, dropout, label_names)

    def pretrained_lm_head(self, cache_dir: Path) -> nn.Module:
        """The frozen masked-LM head of the checkpoint, for ``pretrain_loss='mlm'``."""
        return _models().masked_lm_head(self.path)

    def has_lm_head(self, cache_dir: Path) -> bool:
        return _models().checkpoint_has_lm_head(self.path)

    def with_path(self, text: str) -> ModelSpec:
        return TextClassifier(path=text)


@dataclass
class TinyTextClassifier(BaseModelSpec):
    """A small random BERT (with a masked-LM head) built on the spot and saved once.

    It stands in for a pretrained encoder where nothing may be downloaded: the quickstart,
    tests and CPU benchmarks. Its vocabulary is that of :class:`~sweeper.finetune.data.SyntheticText`.
    """

    layers: int = rules.setting(2, "transformer blocks", rules.Range(1, 12, whole=True))
    hidden: int = rules.setting(64, "width, a multiple of heads", rules.Range(1, whole=True))
    heads: int = rules.setting(2, "attention heads", rules.Range(1, whole=True))
    seed: int = rules.setting(0, "weight initialisation: the same seed gives the same \"pretrained\" model",
                              rules.Range(whole=True))

    kind = "text"

    def check(self) -> list[str]:
        problems = super().check()
        sizes = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (self.hidden, self.heads))
        if sizes and self.hidden % self.heads:
            problems.append(
                f"`model.hidden` is {self.hidden} and `model.heads` {self.heads}: the width must "
                "be a multiple of the head count"
            )
        return problems

    @property
    def path(self) -> str:
        return f"tiny-bert-l{self.layers}-h{self.hidden}-a{self.heads}-s{self.seed}"

    def materialise(self, cache_dir: Path) -> Path:
        """Write the model folder into ``cache_dir`` (once; later calls reuse it)."""
        folder = Path(cache_dir) / self.path
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Released by the kernel if its holder dies, as data.prepare's lock is.
        with FileLock(folder.with_suffix(".lock")):
            if not (folder / "config.json").exists():
                _models().write_tiny_bert(folder, self.layers, self.hidden, self.heads, self.seed)
        return folder

    def num_blocks(self, cache_dir: Path) -> int:
        return self.layers

    def _as_text(self, cache_dir: Path) -> TextClassifier:
        return TextClassifier(str(self.materialise(cache_dir)))

    def tokenizer(self, cache_dir: Path) -> Any:
        return self._as_text(cache_dir).tokenizer(cache_dir)

    def build(self, num_labels: int, cache_dir: Path, dropout: float | None = None,
              label_names: Sequence[str] = ()) -> TextAdapter:
        return self._as_text(cache_dir).build(num_labels, cache_dir, dropout, label_names)

    def pretrained_lm_head(self, cache_dir: Path) -> nn.Module:
        return self._as_text(cache_dir).pretrained_lm_head(cache_dir)

    def has_lm_head(self, cache_dir: Path) -> bool:
        return True

    def with_path(self, text: str) -> ModelSpec:
        """A folder or hub name: the pretrained text model it holds."""
        return TextClassifier(path=text)


@dataclass
class ImageClassifier(BaseModelSpec):
    """A torchvision ResNet with a new final layer."""

    arch: str = rules.setting("resnet18", "the torchvision ResNet", rules.OneOf(RESNETS))
    weights: str = rules.setting("DEFAULT", "torchvision weights name, a local .safetensors file, or \"none\"")

    kind = "image"

    @property
    def path(self) -> str:
        return f"{self.arch}:{self.weights}"

    def num_blocks(self, cache_dir: Path) -> int:
        return RESNET_BLOCKS[self.arch]

    def build(self, num_labels: int, cache_dir: Path, dropout: float | None = None,
              label_names: Sequence[str] = ()) -> ResNetAdapter:
        return _models().resnet_adapter(self.arch, self.weights, num_labels, label_names)

    def with_path(self, text: str) -> ModelSpec:
        """An architecture name picks the architecture; anything else, the weights."""
        if text in RESNETS:
            return dataclasses.replace(self, arch=text)
        return dataclasses.replace(self, weights=text)


# The type of a study's `model` (and the kinds its check accepts): a new kind of model is a
# BaseModelSpec subclass listed here. Only its text members have `pretrained_lm_head`, which
# the `mlm` term needs and the study check refuses for any other.
ModelSpec = TextClassifier | TinyTextClassifier | ImageClassifier


# --------------------------------------------------------------------------- names


def folder_identity(path: str) -> str:
    """A name for cache keys: the path plus the sizes and times of its files."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file()]
    return path + "#" + hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]
