"""The data specs a study names, each answering for itself where its examples come from,
how validation is carved from them, and how they are cached."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sweeper.finetune import phrases, rules
from sweeper.finetune.data import _cache, _readers
from sweeper.finetune.data._readers import Rows
from sweeper.finetune.data._splits import Split, carve
from sweeper.finetune.data._synthetic import synthetic_sentiment

# The package's logger, as before data.py became a package: one name to filter its lines by.
logger = logging.getLogger("sweeper.finetune.data")

VALIDATION_SPLITS = ("random", "sentences")

# Settings that more than one spec has, declared once.
_VALIDATION_FRACTION = rules.Range(0, 1, above=True, below=True)
_MAX_TRAIN_SAMPLES = rules.Range(2, whole=True, unit="examples", none="all")
_MAX_LENGTH = rules.Range(8, 4096, whole=True, unit="tokens")
_MAX_TRAIN_DOC = "cap on training examples after the split (the same prefix for every trial)"
_MAX_LENGTH_DOC = "tokens per example after truncation"


def _distinct_names(value: Any) -> bool:
    names = list(value) if isinstance(value, (list, tuple)) else None
    return names is not None and all(isinstance(n, str) and n.strip() for n in names) and len(set(names)) == len(names)


class BaseDataSpec:
    """What a study's ``data`` answers; each kind of data is one subclass (and one member of
    :data:`DataSpec`), and nothing outside it asks which kind it is.

    Its settings are dataclass fields declared with :func:`rules.setting`, which
    :meth:`check` reads.
    """

    kind: ClassVar[str]  # "text" or "image": the kind of model it pairs with
    validation_fraction: float
    max_train_samples: int | None

    def check(self) -> list[str]:
        """Every problem of the settings, without reading any data."""
        return rules.problems(self, prefix="data.")

    def check_source(self) -> None:
        """Fail now, with one line, if the data cannot be found: before any worker starts,
        and without reading every example."""

    def fingerprint(self) -> Any:
        """What stands for the source's content in the cache key (None: the settings say it all)."""
        return None

    def write_cache(self, folder: Path, seed: int, tokenizer: Any) -> dict[str, Any]:
        """The train, validation and test splits written into ``folder``; the cache's meta."""
        raise NotImplementedError

    def read_split(self, folder: Path, meta: dict[str, Any], name: str) -> Split:
        """The split ``name`` that :meth:`write_cache` wrote into ``folder``."""
        raise NotImplementedError

    def with_path(self, path: str) -> DataSpec:
        """The data ``--set data=PATH`` names instead of this one."""
        raise NotImplementedError


@dataclass
class TextData(BaseDataSpec):
    """Sentence (or sentence-pair) classification from a folder of TSV, CSV, JSON Lines or
    Parquet files, a folder written by `datasets.save_to_disk`, or the Hugging Face hub.

    ``path`` names one of:

    - a folder with one file per split, all of one type, named by ``train`` and ``test`` and
      their extension: ``train.tsv`` and ``validation.tsv`` (tab-separated, a header line, no
      quoting: GLUE's layout), ``.csv`` (comma-separated, a header line, ``"quoted, fields"``),
      ``.jsonl`` (one JSON object per line) or ``.parquet``. Parquet needs ``pyarrow``
      (``pip install 'sweeper[hub]'``);
    - a folder that ``DatasetDict.save_to_disk`` wrote, whose splits ``train`` and ``test``
      name (needs ``datasets``: ``pip install 'sweeper[hub]'``);
    - a hub data set ``"name/config"`` (``"glue/sst2"``), when a network is there.

    Every split is checked whole: the columns ``text_fields`` and ``label_field`` present,
    at least one row, no row without a label or a text. Labels are integers (label k is
    class k) or strings (classes in sorted order). The exported model names its classes
    (``id2label``) by ``label_names`` where the study gives them, else by the data set's own
    names (a ``datasets.ClassLabel``'s, as SST-2 on the hub has), else by the labels themselves.
    """

    path: str = rules.setting("glue/sst2", "a folder of <split>.tsv, .csv, .jsonl or .parquet files, a folder "
                                           "save_to_disk wrote, or a hub data set \"name/config\"")
    train: str = rules.setting("train", "split the sweep trains on (and carves validation from): a file name "
                                        "without its extension, or a split of the data set")
    test: str = rules.setting("validation", "held-out split, evaluated for the best trial only")
    text_fields: tuple[str, ...] = rules.setting(("sentence",), "the text columns", rules.Check(
        lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 2, "one column, or two for sentence pairs",
        "give one column, or two for sentence pairs"))
    label_field: str = rules.setting("label", "integer labels, or strings (mapped in sorted order)")
    # What a pipeline on the exported model answers: ("negative", "positive") for SST-2's 0 and 1.
    label_names: tuple[str, ...] = rules.setting(
        (), "the classes' names in class order (0, 1, ...), for the exported model's id2label; empty: the "
            "data set's own names, else the labels", rules.Check(_distinct_names, "distinct non-empty strings",
                                                                 "give distinct non-empty strings, e.g. "
                                                                 "(\"negative\", \"positive\")"))
    validation_fraction: float = rules.setting(0.05, "share of train held out for tuning", _VALIDATION_FRACTION)
    # "sentences" holds out whole sentences with their phrases that no training sentence holds
    # (phrases.py), for phrase-level data such as SST-2, where a random split's figure
    # flatters (bench/validation_split.py).
    validation_split: str = rules.setting(
        "random", "how validation is carved from train: random examples, or whole sentences and their phrases",
        rules.OneOf(VALIDATION_SPLITS))
    max_train_samples: int | None = rules.setting(None, _MAX_TRAIN_DOC, _MAX_TRAIN_SAMPLES)
    max_length: int = rules.setting(128, _MAX_LENGTH_DOC, _MAX_LENGTH)

    kind = "text"

    def check(self) -> list[str]:
        problems = super().check()
        if self.validation_split == "sentences" and isinstance(self.text_fields, (list, tuple)) \
                and len(self.text_fields) > 1:
            problems.append("`data.validation_split` is 'sentences', which splits single texts, but the data "
                            "has sentence pairs: use 'random'")
        return problems

    def check_source(self) -> None:
        """A hub data set's card read; local files read whole (not tokenised), with the checks
        of :meth:`write_cache`, so that ``sweeper validate`` finds what ``launch`` would."""
        if _readers.is_hub(self):
            _readers.check_hub(self)
            return
        source = _readers.read_text(self)
        _cache.text_labels(source.train, source.test, self.label_field, self.label_names or source.label_names,
                           source.where)
        # The sizes of a random carve-out (a sentence split takes seconds on SST-2: launch checks it).
        train_idx, val_idx = carve(len(source.train), self.validation_fraction, 0)
        _cache.check_carved(len(train_idx), len(val_idx), self.validation_fraction, source.where)

    def fingerprint(self) -> Any:
        return _readers.files_fingerprint(self.path)

    def write_cache(self, folder: Path, seed: int, tokenizer: Any) -> dict[str, Any]:
        source = _readers.read_text(self)
        return _cache.write_text(self, source.train, source.test, folder, seed, tokenizer,
                                 self.label_names or source.label_names, source.where)

    def read_split(self, folder: Path, meta: dict[str, Any], name: str) -> Split:
        return _cache.read_text(folder, meta)

    def carve(self, rows: Rows, seed: int) -> tuple[str, np.ndarray, np.ndarray, int]:
        """How validation was carved, the train and validation indices, and how many whole
        sentences validation holds (``phrases.py``; 0 for a random split)."""
        texts = [row[self.text_fields[0]] for row in rows] if len(self.text_fields) == 1 else []
        if self.validation_split == "random":
            if texts and phrases.looks_phrase_level(texts, seed):
                logger.warning("most training examples lie inside longer ones (phrase-level data such as SST-2): "
                               "a random validation split's figure flatters, by 6 to 7.5 points on SST-2; "
                               "data.validation_split='sentences' gives an honest one (bench/validation_split.py)")
            train_idx, val_idx = carve(len(rows), self.validation_fraction, seed)
            return "random", train_idx, val_idx, 0
        train_idx, val_idx, whole = phrases.sentence_split(texts, self.validation_fraction, seed)
        logger.info("validation: %d whole sentences of the training data and the %d phrases of them that no "
                    "training sentence holds (data.validation_split='sentences')",
                    len(whole), len(val_idx) - len(whole))
        return self.validation_split, train_idx, val_idx, len(whole)

    def with_path(self, path: str) -> DataSpec:
        return dataclasses.replace(self, path=path)


@dataclass
class SyntheticText(BaseDataSpec):
    """A generated sentiment task: sentences of filler words with positive and negative cue
    words, labelled by which kind dominates. Small, offline and learnable in seconds."""

    n_train: int = rules.setting(2000, "generated training sentences (validation is carved from them)",
                                 rules.Range(20, whole=True))
    n_test: int = rules.setting(400, "generated held-out sentences", rules.Range(1, whole=True))
    seed: int = rules.setting(0, "generation seed: the same seed gives the same data on every machine",
                              rules.Range(whole=True))
    validation_fraction: float = rules.setting(0.2, "share of train held out for tuning", _VALIDATION_FRACTION)
    max_train_samples: int | None = rules.setting(None, _MAX_TRAIN_DOC, _MAX_TRAIN_SAMPLES)
    max_length: int = rules.setting(32, _MAX_LENGTH_DOC, _MAX_LENGTH)

    kind = "text"
    # The columns of the generated rows (fixed: not settings).
    text_fields: ClassVar[tuple[str, ...]] = ("sentence",)
    label_field: ClassVar[str] = "label"
    label_names: ClassVar[tuple[str, ...]] = ("negative", "positive")  # labels 0 and 1

    def write_cache(self, folder: Path, seed: int, tokenizer: Any) -> dict[str, Any]:
        train, test = synthetic_sentiment(self.n_train, self.n_test, self.seed)
        return _cache.write_text(self, train, test, folder, seed, tokenizer, self.label_names, "the generated task")

    def read_split(self, folder: Path, meta: dict[str, Any], name: str) -> Split:
        return _cache.read_text(folder, meta)

    def carve(self, rows: Rows, seed: int) -> tuple[str, np.ndarray, np.ndarray, int]:
        """A random split: generated sentences have no phrases to leak."""
        train_idx, val_idx = carve(len(rows), self.validation_fraction, seed)
        return "random", train_idx, val_idx, 0

    def with_path(self, path: str) -> DataSpec:
        return TextData(path=path)


@dataclass
class ImageData(BaseDataSpec):
    """Image classification from an image folder or a torchvision data set."""

    path: str = rules.setting("CIFAR10", "an image folder with train/ and test/, or a torchvision data set name")
    root: str = rules.setting("~/.cache/sweeper/torchvision", "where torchvision data sets are stored")
    download: bool = rules.setting(True, "let torchvision download a named data set (needs a network)", rules.Flag())
    image_size: int = rules.setting(32, "images are resized to image_size x image_size",
                                    rules.Range(16, 512, whole=True, unit="pixels"))
    augment: bool = rules.setting(True, "random crop and horizontal flip on training batches", rules.Flag())
    validation_fraction: float = rules.setting(0.1, "share of train held out for tuning", _VALIDATION_FRACTION)
    max_train_samples: int | None = rules.setting(None, _MAX_TRAIN_DOC, _MAX_TRAIN_SAMPLES)

    kind = "image"

    def check_source(self) -> None:
        path = Path(os.path.expanduser(self.path))
        if path.is_dir():
            _readers.check_image_folder(path)

    def fingerprint(self) -> Any:
        return _readers.files_fingerprint(self.path)

    def write_cache(self, folder: Path, seed: int, tokenizer: Any) -> dict[str, Any]:
        train_x, train_y, test_x, test_y, names = _readers.read_images(self)
        train_idx, val_idx = carve(len(train_y), self.validation_fraction, seed)
        splits = {
            "train": (train_x[train_idx], train_y[train_idx]),
            "validation": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y),
        }
        return _cache.write_images(splits, names, folder)

    def read_split(self, folder: Path, meta: dict[str, Any], name: str) -> Split:
        return _cache.read_images(folder, augment=name == "train" and self.augment)

    def with_path(self, path: str) -> DataSpec:
        return dataclasses.replace(self, path=path)


# The type of a study's `data` (and the kinds its check accepts): a new kind of data is a
# BaseDataSpec subclass listed here.
DataSpec = TextData | SyntheticText | ImageData
