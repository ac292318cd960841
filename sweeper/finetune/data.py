"""Data: where a study's examples come from, and how they reach the model.

Three sources, each a small dataclass a study file names:

- :class:`TextData`: a GLUE-style folder of TSV files (``train.tsv``, ``validation.tsv``,
  a header line, ``sentence<TAB>label``), or a Hugging Face hub data set (``"glue/sst2"``)
  when a network is there.
- :class:`ImageData`: an image folder (``train/<class>/*.png``, ``test/<class>/*.png``) or a
  torchvision data set by name (``"CIFAR10"``).
- :class:`SyntheticText`: a small generated sentiment task that needs nothing from outside:
  the quickstart study and the tests.

Honest selection: the sweep tunes on a *validation* split carved (seeded) out of the
training data; the data set's own held-out split becomes *test*, which is evaluated for the
best trial only.

Everything is prepared once per study and cached on disk as plain ``.npy`` arrays (never
pickled), keyed by a hash of the source, the tokenizer and the settings, so every later
trial and every worker on the machine starts from memory-mapped arrays. A file lock makes
the first worker tokenise while the others wait for its result.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sweeper.errors import SweepError
from sweeper.finetune import phrases

logger = logging.getLogger(__name__)

# Bump when the cached layout changes, so stale caches are rebuilt rather than misread.
CACHE_FORMAT = 1
VALIDATION_SPLITS = ("random", "sentences")


# --------------------------------------------------------------------------- sources


@dataclass
class TextData:
    """Sentence (or sentence-pair) classification from TSV files or the Hugging Face hub."""

    path: str = "glue/sst2"  # a folder of <split>.tsv files, or a hub data set "name/config"
    train: str = "train"  # split the sweep trains on (and carves validation from)
    test: str = "validation"  # held-out split, evaluated for the best trial only
    text_fields: tuple[str, ...] = ("sentence",)  # one column, or two for sentence pairs
    label_field: str = "label"  # integer labels, or strings (mapped in sorted order)
    validation_fraction: float = 0.05  # share of train held out for tuning, 0.01..0.5
    # How validation is carved from train: "random" examples, or "sentences": whole sentences
    # with their phrases that no training sentence holds (phrases.py), for phrase-level data
    # such as SST-2, where a random split's figure flatters (bench/validation_split.py).
    validation_split: str = "random"
    max_train_samples: int | None = None  # cap on training examples after the split; None = all
    max_length: int = 128  # tokens per example after truncation, 8..512

    kind = "text"

    def check(self) -> list[str]:
        problems = _check_split_settings(self.validation_fraction, self.max_train_samples)
        if self.validation_split not in VALIDATION_SPLITS:
            problems.append(f"`data.validation_split` is {self.validation_split!r}: use one of "
                            f"{', '.join(VALIDATION_SPLITS)}")
        elif self.validation_split == "sentences" and len(self.text_fields) > 1:
            problems.append("`data.validation_split` is 'sentences', which splits single texts, but the data "
                            "has sentence pairs: use 'random'")
        if not 1 <= len(self.text_fields) <= 2:
            problems.append(
                f"`data.text_fields` is {list(self.text_fields)!r}: give one column, or two for "
                "sentence pairs"
            )
        if not 8 <= self.max_length <= 4096:
            problems.append(f"`data.max_length` is {self.max_length}: use 8..4096 tokens")
        return problems


@dataclass
class SyntheticText:
    """A generated sentiment task: sentences of filler words with positive and negative cue
    words, labelled by which kind dominates. Small, offline and learnable in seconds."""

    n_train: int = 2000  # generated training sentences (validation is carved from them)
    n_test: int = 400  # generated held-out sentences
    seed: int = 0  # generation seed: the same seed gives the same data on every machine
    validation_fraction: float = 0.2  # share of train held out for tuning
    max_train_samples: int | None = None
    max_length: int = 32  # tokens per example after truncation

    kind = "text"

    def check(self) -> list[str]:
        problems = _check_split_settings(self.validation_fraction, self.max_train_samples)
        if self.n_train < 20 or self.n_test < 1:
            problems.append(
                f"`data.n_train` is {self.n_train} and `data.n_test` {self.n_test}: use at least "
                "20 and 1"
            )
        return problems


@dataclass
class ImageData:
    """Image classification from an image folder or a torchvision data set."""

    path: str = "CIFAR10"  # an image folder with train/ and test/, or a torchvision data set name
    root: str = "~/.cache/sweeper/torchvision"  # where torchvision data sets are stored
    download: bool = True  # let torchvision download a named data set (needs a network)
    image_size: int = 32  # images are resized to image_size x image_size, 16..512
    augment: bool = True  # random crop and horizontal flip on training batches
    validation_fraction: float = 0.1
    max_train_samples: int | None = None

    kind = "image"

    def check(self) -> list[str]:
        problems = _check_split_settings(self.validation_fraction, self.max_train_samples)
        if not 16 <= self.image_size <= 512:
            problems.append(f"`data.image_size` is {self.image_size}: use 16..512 pixels")
        return problems


DataSpec = TextData | SyntheticText | ImageData


def _check_split_settings(fraction: float, max_train: int | None) -> list[str]:
    problems = []
    if not 0.0 < fraction < 1.0:
        problems.append(
            f"`data.validation_fraction` is {fraction}: use a share between 0 and 1, e.g. 0.05"
        )
    if max_train is not None and max_train < 2:
        problems.append(f"`data.max_train_samples` is {max_train}: use at least 2, or None for all")
    return problems


# --------------------------------------------------------------------------- splits


class Split(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]: ...

    def lengths(self) -> np.ndarray: ...


@dataclass
class TextSplit:
    """Tokenised examples stored flat: example i is ``input_ids[offsets[i]:offsets[i+1]]``."""

    input_ids: np.ndarray  # int32, all examples concatenated
    offsets: np.ndarray  # int64, len(self) + 1
    labels: np.ndarray  # int64
    pad_id: int
    token_type_ids: np.ndarray | None = None  # int8, same layout as input_ids; None = all zero

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Pad the chosen examples to the longest of them (dynamic padding)."""
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        width = int((ends - starts).max())
        ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        types = np.zeros((len(indices), width), dtype=np.int64)
        for row, (start, end) in enumerate(zip(starts, ends)):
            ids[row, : end - start] = self.input_ids[start:end]
            mask[row, : end - start] = 1
            if self.token_type_ids is not None:
                types[row, : end - start] = self.token_type_ids[start:end]
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.from_numpy(types),
            "labels": torch.from_numpy(self.labels[indices].astype(np.int64)),
        }
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def subset(self, indices: np.ndarray) -> TextSplit:
        lengths = self.lengths()[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = [self.input_ids[self.offsets[i] : self.offsets[i + 1]] for i in indices]
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        types = None
        if self.token_type_ids is not None:
            tpieces = [self.token_type_ids[self.offsets[i] : self.offsets[i + 1]] for i in indices]
            types = np.concatenate(tpieces) if tpieces else np.zeros(0, dtype=np.int8)
        return TextSplit(ids, offsets, self.labels[indices], self.pad_id, types)


# ImageNet statistics: every torchvision ResNet was pretrained on inputs normalised this way.
_IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class ImageSplit:
    images: np.ndarray  # uint8, N x H x W x 3
    labels: np.ndarray  # int64
    augment: bool = False  # random crop (padding 4) and horizontal flip, per batch

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.ones(len(self.labels), dtype=np.int64)

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[indices])).to(device)
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment:
            pixels = _augment(pixels)
        pixels = (pixels - _IMAGE_MEAN.to(device)) / _IMAGE_STD.to(device)
        labels = torch.from_numpy(self.labels[indices].astype(np.int64)).to(device)
        return {"pixel_values": pixels, "labels": labels}

    def subset(self, indices: np.ndarray) -> ImageSplit:
        return ImageSplit(self.images[indices], self.labels[indices], self.augment)


def _augment(pixels: torch.Tensor) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip (the standard CIFAR recipe)."""
    n, _, h, w = pixels.shape
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,)).tolist()
    dx = torch.randint(0, 9, (n,)).tolist()
    crops = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    flip = torch.rand(n, device=pixels.device) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


@dataclass
class PreparedData:
    """The three splits of a study, ready for batching."""

    train: Any  # TextSplit | ImageSplit
    validation: Any
    test: Any
    num_labels: int
    label_names: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def training_batches(
    lengths: np.ndarray, batch_size: int, seed: int, bucket_factor: int = 50
) -> list[np.ndarray]:
    """Shuffled batches of examples of similar length, different for every ``seed``.

    Examples are shuffled, cut into pools of ``batch_size * bucket_factor``, each pool sorted
    by length and cut into batches, and the batches shuffled: padding shrinks to a few tokens
    while every epoch still sees a different order (the "bucket iterator" of AllenNLP/fairseq).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    pool = batch_size * bucket_factor
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type, unused-ignore]
    return batches


def evaluation_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """All examples once, sorted by length so that padding is minimal."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- preparation


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
        "source": _source_fingerprint(spec),
        "tokenizer": tokenizer_id,
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()
    folder = Path(cache_dir) / f"{type(spec).__name__.lower()}-{key[:16]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.with_suffix(".lock")):
        if not (folder / "meta.json").exists():
            logger.info("preparing %s into %s", type(spec).__name__, folder)
            _build_cache(spec, folder, seed, tokenizer)
    prepared = _load_cache(folder, spec)
    if spec.max_train_samples is not None and spec.max_train_samples < len(prepared.train):
        # The cut is a prefix of an already shuffled split: the same for every trial.
        prepared.train = prepared.train.subset(np.arange(spec.max_train_samples))
    return prepared


class _file_lock:
    """An exclusive ``flock`` on a file: released by the kernel if the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: Any = None

    def __enter__(self) -> None:
        self.handle = open(self.path, "a+")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _source_fingerprint(spec: DataSpec) -> Any:
    """Size and modification time of local source files, so edited data is re-prepared."""
    if isinstance(spec, SyntheticText):
        return None
    path = Path(os.path.expanduser(spec.path))
    if not path.exists():
        return spec.path
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files[:100_000]:
        stat = f.stat()
        digest.update(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _build_cache(spec: DataSpec, folder: Path, seed: int, tokenizer: Any) -> None:
    # Build in a temporary folder and rename: a reader never sees half a cache.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        if isinstance(spec, ImageData):
            meta = _build_images(spec, tmp, seed)
        else:
            if tokenizer is None:
                raise SweepError("a text data set needs the model's tokenizer")
            meta = _build_text(spec, tmp, seed, tokenizer)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _carve(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) index arrays: validation is ``fraction`` of ``n``."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


def _build_text(spec: TextData | SyntheticText, folder: Path, seed: int, tokenizer: Any) -> dict:
    if isinstance(spec, SyntheticText):
        train_rows, test_rows = synthetic_sentiment(spec.n_train, spec.n_test, spec.seed)
        fields: tuple[str, ...] = ("sentence",)
        label_field = "label"
    else:
        train_rows, test_rows = _read_text_source(spec)
        fields, label_field = spec.text_fields, spec.label_field
    label_names = _label_names(train_rows, label_field)
    how, train_idx, val_idx, sentences = _carve_text(spec, train_rows, fields, seed)
    splits = {
        "train": [train_rows[i] for i in train_idx],
        "validation": [train_rows[i] for i in val_idx],
        "test": test_rows,
    }
    for name, rows in splits.items():
        _tokenize_split(rows, fields, label_field, label_names, tokenizer, spec.max_length,
                        folder / name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"kind": "text", "label_names": label_names, "pad_id": int(pad_id),
            "sizes": {k: len(v) for k, v in splits.items()}, "validation_split": how, "validation_sentences": sentences}


def _carve_text(spec: TextData | SyntheticText, rows: list[dict[str, str]], fields: tuple[str, ...],
                seed: int) -> tuple[str, np.ndarray, np.ndarray, int]:
    """How validation was carved, the train and validation indices, and how many whole
    sentences validation holds (``phrases.py``; 0 for a random split)."""
    how = getattr(spec, "validation_split", "random")  # generated data has no phrases to leak
    texts = [row[fields[0]] for row in rows] if len(fields) == 1 else []
    if how == "random":
        if isinstance(spec, TextData) and texts and phrases.looks_phrase_level(texts, seed):
            logger.warning("most training examples lie inside longer ones (phrase-level data such as SST-2): "
                           "a random validation split's figure flatters, by 6 to 7.5 points on SST-2; "
                           "data.validation_split='sentences' gives an honest one (bench/validation_split.py)")
        train_idx, val_idx = _carve(len(rows), spec.validation_fraction, seed)
        return how, train_idx, val_idx, 0
    train_idx, val_idx, whole = phrases.sentence_split(texts, spec.validation_fraction, seed)
    logger.info("validation: %d whole sentences of the training data and the %d phrases of them that no "
                "training sentence holds (data.validation_split='sentences')", len(whole), len(val_idx) - len(whole))
    return how, train_idx, val_idx, len(whole)


def _label_names(rows: list[dict[str, str]], label_field: str) -> list[str]:
    values = sorted({row[label_field] for row in rows})
    if all(v.lstrip("-").isdigit() for v in values):
        values = sorted(values, key=int)
        # Integer labels keep their meaning: label k is class k (GLUE convention).
        return [str(i) for i in range(int(values[-1]) + 1)] if values else []
    return values


def _tokenize_split(
    rows: list[dict[str, str]],
    fields: tuple[str, ...],
    label_field: str,
    label_names: list[str],
    tokenizer: Any,
    max_length: int,
    folder: Path,
) -> None:
    folder.mkdir(parents=True)
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.array([index.get(row[label_field], -1) for row in rows], dtype=np.int64)
    if (labels < 0).any():
        bad = rows[int(np.argmax(labels < 0))][label_field]
        raise SweepError(
            f"the test split has the label {bad!r}, which the training split never uses: "
            "check `data.label_field` and the files"
        )
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


def _read_text_source(spec: TextData) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    path = Path(os.path.expanduser(spec.path))
    if path.is_dir():
        return _read_tsv(path, spec.train, spec), _read_tsv(path, spec.test, spec)
    if _looks_local(spec.path):
        raise _missing_folder(spec)
    return _read_hub(spec)


def check_source(spec: DataSpec) -> None:
    """Fail now, with one line, if the data cannot be found: before any worker starts, and
    without reading every example."""
    if isinstance(spec, SyntheticText):
        return
    path = Path(os.path.expanduser(spec.path))
    if isinstance(spec, ImageData):
        if path.is_dir():
            for split in ("train", "test"):
                if not (path / split).is_dir():
                    raise SweepError(f"`data.path` {str(path)!r} has no {split}/ folder: an image folder "
                                     "needs train/<class>/*.png and test/<class>/*.png")
        return
    if path.is_dir():
        for split in (spec.train, spec.test):
            with _open_tsv(path, split, spec):
                pass
        return
    if _looks_local(spec.path):
        raise _missing_folder(spec)
    _read_hub(spec, check_only=True)


def _looks_local(path: str) -> bool:
    """A path that can only mean a local folder (a hub name looks like ``glue/sst2``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix != ""


def _missing_folder(spec: TextData) -> SweepError:
    return SweepError(
        f"`data.path` is {spec.path!r}, which does not exist: point it at a folder of "
        f"{spec.train}.tsv and {spec.test}.tsv, or at a hub data set such as glue/sst2"
    )


class _open_tsv:
    """A TSV split as a ``csv.DictReader``, its columns checked against the study."""

    def __init__(self, folder: Path, split: str, spec: TextData) -> None:
        self.file = folder / f"{split}.tsv"
        if not self.file.is_file():
            raise SweepError(
                f"`data.path` {str(folder)!r} has no {self.file.name}: the folder needs "
                f"{spec.train}.tsv and {spec.test}.tsv (or set `data.train`/`data.test`)"
            )
        self.spec = spec

    def __enter__(self) -> csv.DictReader[str]:
        self.handle = open(self.file, newline="", encoding="utf-8")
        reader = csv.DictReader(self.handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        wanted = (*self.spec.text_fields, self.spec.label_field)
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            self.handle.close()
            raise SweepError(
                f"{self.file} has the columns {reader.fieldnames}, but the study reads {missing}: "
                "set `data.text_fields` and `data.label_field` to its column names"
            )
        return reader

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def _read_tsv(folder: Path, split: str, spec: TextData) -> list[dict[str, str]]:
    with _open_tsv(folder, split, spec) as reader:
        return [row for row in reader if row.get(spec.label_field) not in (None, "")]


def _read_hub(spec: TextData, check_only: bool = False) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    try:
        import datasets  # optional: pip install 'sweeper[hub]'
    except ImportError:
        raise SweepError(
            f"`data.path` is {spec.path!r}, a Hugging Face hub data set, but the `datasets` package "
            "is not installed: pip install 'sweeper[hub]', or point `data.path` at a local TSV "
            "folder (e.g. --set data.path=../shared/data/sst2)"
        ) from None
    name, _, config = spec.path.partition("/")
    try:
        if check_only:
            datasets.load_dataset_builder(name, config or None)
            return [], []
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the hub raises many kinds; all mean "not reachable here"
        raise SweepError(
            f"could not load the data set {spec.path!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): point `data.path` at a "
            "local TSV folder, e.g. --set data.path=../shared/data/sst2"
        ) from None

    def rows(split: str) -> list[dict[str, str]]:
        return [{k: str(v) for k, v in example.items()} for example in loaded[split]]

    return rows(spec.train), rows(spec.test)


_POSITIVE = "good great fine superb lovely brilliant moving charming fresh witty".split()
_NEGATIVE = "bad awful dull boring tedious clumsy weak stale flat messy".split()
_FILLER = (
    "the a film movie story plot actor scene it is was and but with very quite this that "
    "director script cast ending music pace some of its".split()
)


def synthetic_vocabulary() -> list[str]:
    """The words :func:`synthetic_sentiment` uses, for building a matching tokenizer."""
    return sorted(set(_POSITIVE + _NEGATIVE + _FILLER + ["not"]))


def synthetic_sentiment(
    n_train: int, n_test: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Generated sentences labelled 1 when positive cue words outnumber negative ones.

    A "not" before a cue word flips it, so the task needs word order, not only a bag of
    words: a linear probe plateaus below what fine-tuning reaches.
    """
    rng = random.Random(seed)

    def sentence() -> dict[str, str]:
        words: list[str] = []
        score = 0
        while score == 0:
            words = [rng.choice(_FILLER) for _ in range(rng.randint(4, 12))]
            score = 0
            for _ in range(rng.randint(1, 3)):
                positive = rng.random() < 0.5
                negated = rng.random() < 0.25
                cue = rng.choice(_POSITIVE if positive else _NEGATIVE)
                at = rng.randint(0, len(words))
                words[at:at] = ["not", cue] if negated else [cue]
                score += (1 if positive else -1) * (-1 if negated else 1)
        return {"sentence": " ".join(words), "label": str(int(score > 0))}

    return [sentence() for _ in range(n_train)], [sentence() for _ in range(n_test)]


def _build_images(spec: ImageData, folder: Path, seed: int) -> dict:
    train_x, train_y, test_x, test_y, names = _read_images(spec)
    train_idx, val_idx = _carve(len(train_y), spec.validation_fraction, seed)
    for name, (x, y) in {
        "train": (train_x[train_idx], train_y[train_idx]),
        "validation": (train_x[val_idx], train_y[val_idx]),
        "test": (test_x, test_y),
    }.items():
        (folder / name).mkdir(parents=True)
        np.save(folder / name / "images.npy", x)
        np.save(folder / name / "labels.npy", y.astype(np.int64))
    return {"kind": "image", "label_names": names,
            "sizes": {"train": len(train_idx), "validation": len(val_idx), "test": len(test_y)}}


def _read_images(spec: ImageData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    try:
        import torchvision  # optional: pip install 'sweeper[vision]'
        from PIL import Image
    except ImportError:
        raise SweepError(
            "image data needs torchvision: pip install 'sweeper[vision]'"
        ) from None
    path = Path(os.path.expanduser(spec.path))
    size = spec.image_size

    def to_array(images: Any) -> np.ndarray:
        out = np.zeros((len(images), size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            image = image if isinstance(image, Image.Image) else Image.fromarray(image)
            out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        return out

    if path.is_dir():
        splits = []
        for split in ("train", "test"):
            if not (path / split).is_dir():
                raise SweepError(
                    f"`data.path` {str(path)!r} has no {split}/ folder: an image folder needs "
                    "train/<class>/*.png and test/<class>/*.png"
                )
            folder = torchvision.datasets.ImageFolder(str(path / split))
            images = [Image.open(p) for p, _ in folder.samples]
            splits.append((to_array(images), np.array(folder.targets), folder.classes))
        (train_x, train_y, names), (test_x, test_y, _) = splits
        return train_x, train_y, test_x, test_y, names
    factory = getattr(torchvision.datasets, spec.path, None)
    if factory is None:
        raise SweepError(
            f"`data.path` is {spec.path!r}: neither an image folder nor a torchvision data set "
            "(e.g. CIFAR10, CIFAR100)"
        )
    root = os.path.expanduser(spec.root)
    try:
        train = factory(root, train=True, download=spec.download)
        test = factory(root, train=False, download=spec.download)
    except Exception as exc:
        raise SweepError(
            f"could not load torchvision's {spec.path} into {root} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]}): with no network, put it there first, or point "
            "`data.path` at an image folder"
        ) from None
    names = list(getattr(train, "classes", []))
    return (to_array(train.data), np.array(train.targets), to_array(test.data),
            np.array(test.targets), names)


def _load_cache(folder: Path, spec: DataSpec) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())

    def load(name: str) -> Any:
        split = folder / name
        labels = np.load(split / "labels.npy")
        if meta["kind"] == "image":
            augment = name == "train" and isinstance(spec, ImageData) and spec.augment
            return ImageSplit(np.load(split / "images.npy", mmap_mode="r"), labels, augment)
        types_file = split / "token_type_ids.npy"
        return TextSplit(
            np.load(split / "input_ids.npy", mmap_mode="r"),
            np.load(split / "offsets.npy"),
            labels,
            meta["pad_id"],
            np.load(types_file, mmap_mode="r") if types_file.exists() else None,
        )

    names = meta["label_names"]
    return PreparedData(load("train"), load("validation"), load("test"), len(names), names)


def iterate(split: Split, batches: list[np.ndarray], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for indices in batches:
        yield split.batch(indices, device)
