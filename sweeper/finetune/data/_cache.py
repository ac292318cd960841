"""The on-disk cache: a study's splits prepared once, then memory-mapped by every trial.

Plain ``.npy`` arrays (never pickled) and a ``meta.json``, in a folder named by a hash of the
source, the tokenizer and the settings. The first worker to get the lock builds the folder
(in a temporary one renamed into place, so no reader sees half of it) while the others wait
for it; the lock is ``flock``'s, which the kernel releases if its holder dies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from filelock import FileLock

from sweeper.errors import SweepError
from sweeper.finetune.data._readers import Rows
from sweeper.finetune.data._splits import ImageSplit, PreparedData, TextSplit

if TYPE_CHECKING:
    from sweeper.finetune.data._specs import DataSpec

# The package's logger, as before data.py became a package: one name to filter its lines by.
logger = logging.getLogger("sweeper.finetune.data")

# Bump when the cached layout changes, so stale caches are rebuilt rather than misread.
# 2: label names from the data (a ClassLabel's, `label_names`, the generated task's).
CACHE_FORMAT = 2
SPLITS = ("train", "validation", "test")


def prepare(
    spec: DataSpec,
    cache_dir: Path,
    seed: int,
    tokenizer: Any = None,
    tokenizer_id: str = "",
) -> PreparedData:
    """The study's splits, built once and then read from ``cache_dir`` by every worker."""
    key_source = {
        "format": CACHE_FORMAT,
        "spec": {k: v for k, v in asdict(spec).items() if k not in {"max_train_samples"}},
        "kind": type(spec).__name__,
        "source": spec.fingerprint(),
        "tokenizer": tokenizer_id,
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()
    folder = Path(cache_dir) / f"{type(spec).__name__.lower()}-{key[:16]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_suffix(".lock")):
        if not (folder / "meta.json").exists():
            logger.info("preparing %s into %s", type(spec).__name__, folder)
            _build(spec, folder, seed, tokenizer)
    meta = json.loads((folder / "meta.json").read_text())
    names = meta["label_names"]
    train, validation, test = (spec.read_split(folder / split, meta, split) for split in SPLITS)
    prepared = PreparedData(train, validation, test, len(names), names)
    if spec.max_train_samples is not None and spec.max_train_samples < len(prepared.train):
        # The cut is a prefix of an already shuffled split: the same for every trial.
        prepared.train = prepared.train.subset(np.arange(spec.max_train_samples))
    return prepared


def _build(spec: DataSpec, folder: Path, seed: int, tokenizer: Any) -> None:
    # Build in a temporary folder and rename: a reader never sees half a cache.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        meta = spec.write_cache(tmp, seed, tokenizer)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- text


class TextSource(Protocol):
    """What the text writer asks of a text data spec."""

    @property
    def text_fields(self) -> tuple[str, ...]: ...

    @property
    def label_field(self) -> str: ...

    @property
    def max_length(self) -> int: ...

    @property
    def validation_fraction(self) -> float: ...

    def carve(self, rows: Rows, seed: int) -> tuple[str, np.ndarray, np.ndarray, int]: ...


def write_text(spec: TextSource, train_rows: Rows, test_rows: Rows, folder: Path, seed: int,
               tokenizer: Any, names: Sequence[str] = (), where: str = "the data") -> dict[str, Any]:
    """Validation carved from ``train_rows``, the three splits tokenised into ``folder``; the
    cache's meta. ``names`` are the classes' names in class order, where the study or the data
    gives them; ``where`` is what messages call the data."""
    if tokenizer is None:
        raise SweepError("a text data set needs the model's tokenizer")
    fields, label_field = spec.text_fields, spec.label_field
    label_names, classes = text_labels(train_rows, test_rows, label_field, names, where)
    how, train_idx, val_idx, sentences = carve_checked(spec, train_rows, seed, where)
    splits = {
        "train": [train_rows[i] for i in train_idx],
        "validation": [train_rows[i] for i in val_idx],
        "test": test_rows,
    }
    for name, rows in splits.items():
        _tokenize_split(rows, fields, label_field, classes, tokenizer, spec.max_length, folder / name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"kind": "text", "label_names": label_names, "pad_id": int(pad_id),
            "sizes": {k: len(v) for k, v in splits.items()}, "validation_split": how, "validation_sentences": sentences}


def carve_checked(spec: TextSource, rows: Rows, seed: int, where: str) -> tuple[str, np.ndarray, np.ndarray, int]:
    """``spec.carve``, and one line when it leaves nothing to train on."""
    how, train_idx, val_idx, sentences = spec.carve(rows, seed)
    check_carved(len(train_idx), len(val_idx), spec.validation_fraction, where)
    return how, train_idx, val_idx, sentences


def check_carved(n_train: int, n_validation: int, fraction: float, where: str) -> None:
    """One line when the carve-out leaves no training example (validation always holds one
    at least: ``splits.carve``)."""
    if n_train == 0:
        raise SweepError(
            f"the training split of {where} has {n_train + n_validation} row(s), and `data.validation_fraction` "
            f"({fraction}) holds out {n_validation} of them for validation, which leaves none to train on: "
            "add rows, or lower `data.validation_fraction`"
        )


def read_text(folder: Path, meta: dict[str, Any]) -> TextSplit:
    """One split that :func:`write_text` wrote, its token arrays memory-mapped."""
    types_file = folder / "token_type_ids.npy"
    return TextSplit(
        np.load(folder / "input_ids.npy", mmap_mode="r"),
        np.load(folder / "offsets.npy"),
        np.load(folder / "labels.npy"),
        meta["pad_id"],
        np.load(types_file, mmap_mode="r") if types_file.exists() else None,
    )


def text_labels(train: Rows, test: Rows, label_field: str, names: Sequence[str],
                where: str) -> tuple[list[str], dict[str, int]]:
    """The classes' names in class order, and each label text's class; one line for labels
    that cannot be classes.

    Integer labels keep their meaning, label k is class k (the GLUE convention), named by
    ``names`` where given, else by the numbers; string labels are classes in the order of
    ``names``, or sorted.
    """
    values = sorted({row[label_field] for row in train})
    if all(_is_integer(v) for v in values):
        numbers = sorted(int(v) for v in values)
        if numbers[0] < 0:
            raise SweepError(
                f"the training split of {where} has the label {numbers[0]}, but integer labels are the classes "
                "0, 1, ... (a data set marks the rows of an unlabelled split with -1): use a labelled split"
            )
        count = max(numbers[-1] + 1, len(names))
        if names and len(names) < count:
            raise SweepError(f"the labels of {where} go up to {numbers[-1]}, but {len(names)} label names are "
                             f"given ({list(names)}): give `data.label_names` one name per class, 0..{numbers[-1]}")
        label_names = list(names) or [str(k) for k in range(count)]
        classes = {v: int(v) for v in {row[label_field] for row in (*train, *test)} if _is_integer(v)}
    else:
        unnamed = [v for v in values if v not in names]
        if names and unnamed:
            raise SweepError(f"the training split of {where} has the labels {unnamed[:5]}, which `data.label_names` "
                             f"({list(names)}) leaves out: name every label, or leave `data.label_names` empty")
        label_names = list(names) or values
        classes = {name: k for k, name in enumerate(label_names)}
    if len(values) < 2:
        raise SweepError(f"the training split of {where} has only the label {values[0]!r}: a classifier needs "
                         f"two classes or more; check `data.label_field` ({label_field!r}) and the files")
    unknown = next((row[label_field] for row in test if classes.get(row[label_field], -1) not in
                    range(len(label_names))), None)
    if unknown is not None:
        raise SweepError(
            f"the test split of {where} has the label {unknown!r}, which the training split never uses: "
            "check `data.label_field` and the files"
        )
    return label_names, classes


def _is_integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _tokenize_split(
    rows: Rows,
    fields: tuple[str, ...],
    label_field: str,
    classes: dict[str, int],
    tokenizer: Any,
    max_length: int,
    folder: Path,
) -> None:
    folder.mkdir(parents=True)
    labels = np.array([classes[row[label_field]] for row in rows], dtype=np.int64)
    texts = [[row[f] for row in rows] for f in fields]
    ids_list: list[list[int]] = []
    types_list: list[list[int]] = []
    step = 4096  # the fast tokenizer is fastest on large batches; this bounds its memory
    for start in range(0, len(rows), step):
        chunk = [t[start : start + step] for t in texts]
        encoded = tokenizer(*chunk, truncation=True, max_length=max_length)
        ids_list.extend(encoded["input_ids"])
        types_list.extend(encoded.get("token_type_ids") or [[0] * len(x) for x in encoded["input_ids"]])
    lengths = np.array([len(x) for x in ids_list], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in ids_list for t in x), dtype=np.int32, count=int(offsets[-1]))
    np.save(folder / "input_ids.npy", flat)
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "labels.npy", labels)
    if len(fields) > 1:
        types = np.fromiter((t for x in types_list for t in x), dtype=np.int8, count=len(flat))
        np.save(folder / "token_type_ids.npy", types)


# --------------------------------------------------------------------------- images


def write_images(splits: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str],
                 folder: Path) -> dict[str, Any]:
    """``{split: (images, labels)}`` into ``folder``; the cache's meta."""
    for name, (x, y) in splits.items():
        (folder / name).mkdir(parents=True)
        np.save(folder / name / "images.npy", x)
        np.save(folder / name / "labels.npy", y.astype(np.int64))
    return {"kind": "image", "label_names": names, "sizes": {k: len(y) for k, (_, y) in splits.items()}}


def read_images(folder: Path, augment: bool) -> ImageSplit:
    """One split that :func:`write_images` wrote, its images memory-mapped."""
    return ImageSplit(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"), augment)
