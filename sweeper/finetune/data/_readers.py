"""Reading a data set where it lies: folders of TSV, CSV, JSON Lines or Parquet files, folders
written by ``datasets.save_to_disk``, the Hugging Face hub, image folders and torchvision's
data sets. Each failure is one line that says what to do."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.errors import SweepError

if TYPE_CHECKING:
    from sweeper.finetune.data._specs import ImageData, TextData

Rows = list[dict[str, str]]

# The file types a text folder may hold, one type per folder: <split>.tsv, <split>.csv, ...
TEXT_FILE_TYPES = (".tsv", ".csv", ".jsonl", ".parquet")
_TYPES_TEXT = ".tsv, .csv, .jsonl or .parquet"
_HUB_EXTRA = "pip install 'sweeper[hub]'"
# A folder that `datasets.DatasetDict.save_to_disk` wrote has this file; one `Dataset` has only
# state.json (and no splits to train and test on).
_SAVED_SPLITS = "dataset_dict.json"
_SAVED_ONE = "state.json"


def files_fingerprint(source: str) -> Any:
    """Size and modification time of local source files, so edited data is re-prepared; the
    name itself for a source that is not a local path (a hub or torchvision name)."""
    path = Path(os.path.expanduser(source))
    if not path.exists():
        return source
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files[:100_000]:
        stat = f.stat()
        digest.update(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- text


@dataclass
class RawText:
    """The rows of a study's train and test splits, and the label names the data carries
    (a ``datasets.ClassLabel``'s, in class order; empty where the labels are plain values)."""

    train: Rows
    test: Rows
    label_names: list[str] = field(default_factory=list)
    where: str = ""  # what the messages call the data: its folder, or "'glue/sst2'"


def read_text(spec: TextData) -> RawText:
    """The rows of the train and test splits: from a folder of files of one type, a folder
    that ``save_to_disk`` wrote, or the hub."""
    path = Path(os.path.expanduser(spec.path))
    if path.is_dir():
        if (path / _SAVED_SPLITS).is_file() or (path / _SAVED_ONE).is_file():
            return _read_saved(path, spec)
        train, test = (_split_file(path, split, spec) for split in (spec.train, spec.test))
        if train.suffix != test.suffix:
            raise SweepError(f"`data.path` {str(path)!r} holds {train.name} but {test.name}: save both "
                             "splits as one type of file")
        return RawText(_read_file(train, spec), _read_file(test, spec), where=str(path))
    if path.exists() or _looks_local(spec.path):
        raise _not_a_folder(spec, path)
    return _read_hub(spec)


def is_hub(spec: TextData) -> bool:
    """Whether ``data.path`` names a hub data set (``name/config``) rather than local files."""
    return not (Path(os.path.expanduser(spec.path)).exists() or _looks_local(spec.path))


def check_hub(spec: TextData) -> None:
    """The hub data set reachable, with the study's splits and columns (read from its card,
    without downloading the examples)."""
    datasets = _import_datasets(f"`data.path` is {spec.path!r}, a Hugging Face hub data set")
    name, _, config = spec.path.partition("/")
    with _hub_errors(spec):
        builder = datasets.load_dataset_builder(name, config or None)
    splits, features = builder.info.splits, builder.info.features
    for split in (spec.train, spec.test):
        if splits and split not in splits:
            raise _missing_split(spec, split, list(splits))
    if features is not None:
        _check_columns(list(features), spec, repr(spec.path))


def _read_hub(spec: TextData) -> RawText:
    """The train and test splits of a hub data set ``"name/config"``."""
    datasets = _import_datasets(f"`data.path` is {spec.path!r}, a Hugging Face hub data set")
    name, _, config = spec.path.partition("/")
    with _hub_errors(spec):
        loaded = datasets.load_dataset(name, config or None)
    return _from_datasets(loaded, spec, repr(spec.path))


def _looks_local(path: str) -> bool:
    """A path that can only mean a local folder (a hub name looks like ``glue/sst2``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix != ""


def _not_a_folder(spec: TextData, path: Path) -> SweepError:
    if path.is_file():
        return SweepError(f"`data.path` is {spec.path!r}, a file: point it at the folder that holds "
                          f"{spec.train} and {spec.test} files of one type ({_TYPES_TEXT})")
    return SweepError(
        f"`data.path` is {spec.path!r}, which does not exist: point it at a folder of "
        f"{spec.train}.tsv and {spec.test}.tsv (or .csv, .jsonl, .parquet, or a folder written by "
        "save_to_disk), or at a hub data set such as glue/sst2"
    )


def _split_file(folder: Path, split: str, spec: TextData) -> Path:
    """The one file of ``folder`` that holds ``split``, whatever its type."""
    found = [folder / f"{split}{ext}" for ext in TEXT_FILE_TYPES if (folder / f"{split}{ext}").is_file()]
    if not found:
        raise SweepError(
            f"`data.path` {str(folder)!r} has no {split}.tsv: the folder needs {spec.train} and "
            f"{spec.test} files of one type ({_TYPES_TEXT}, e.g. {spec.train}.csv and {spec.test}.csv), "
            "or set `data.train`/`data.test` to its file names without the extension"
        )
    if len(found) > 1:
        raise SweepError(f"`data.path` {str(folder)!r} holds {' and '.join(f.name for f in found)}: keep one "
                         f"type of file for the split {split!r}")
    return found[0]


# Where a record sits in its file, for messages: "line 7" of a text file, "row 7" of a table.
Records = Iterator[tuple[str, dict[str, Any]]]


def _read_file(file: Path, spec: TextData) -> Rows:
    """One split's file, of any of :data:`TEXT_FILE_TYPES`, as checked rows."""
    if file.stat().st_size == 0:
        raise SweepError(f"{file} is empty: it needs a header of column names and one example per "
                         f"row, with the columns {_wanted(spec)}")
    readers: dict[str, Callable[[Path, TextData], Records]] = {
        ".tsv": _tsv_records, ".csv": _csv_records, ".jsonl": _jsonl_records, ".parquet": _parquet_records,
    }
    try:
        return _checked_rows(readers[file.suffix](file, spec), spec, str(file))
    except UnicodeDecodeError as exc:
        raise SweepError(f"{file} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}): "
                         "save it as UTF-8") from None
    except csv.Error as exc:
        raise SweepError(f"{file} cannot be read as {file.suffix[1:].upper()} ({exc}): check the file") from None


def _delimited_records(file: Path, spec: TextData, **dialect: Any) -> Records:
    with open(file, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, **dialect)
        _check_columns(list(reader.fieldnames or []), spec, str(file))
        for record in reader:
            yield f"line {reader.line_num}", record


def _tsv_records(file: Path, spec: TextData) -> Records:
    # GLUE's TSVs hold raw quotes inside sentences: no quoting at all.
    return _delimited_records(file, spec, delimiter="\t", quoting=csv.QUOTE_NONE)


def _csv_records(file: Path, spec: TextData) -> Records:
    return _delimited_records(file, spec)  # the excel dialect: commas, "quoted, fields"


def _jsonl_records(file: Path, spec: TextData) -> Records:
    with open(file, encoding="utf-8") as handle:
        checked = False
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SweepError(f"line {number} of {file} is not JSON ({exc.msg}, column {exc.colno}): "
                                 "a .jsonl file holds one JSON object per line") from None
            if not isinstance(record, dict):
                raise SweepError(f"line {number} of {file} is a JSON {type(record).__name__}, not an object: "
                                 "a .jsonl file holds one object per line, e.g. "
                                 '{"sentence": "a fine film", "label": 1}')
            if not checked:  # a JSON Lines file declares no columns: its first object stands for them
                _check_columns(list(record), spec, str(file))
                checked = True
            yield f"line {number}", record


def _parquet_records(file: Path, spec: TextData) -> Records:
    try:
        import pyarrow  # optional: pip install 'sweeper[hub]'
        import pyarrow.parquet as pq
    except ImportError:
        raise SweepError(f"{file} is a Parquet file, and reading it needs the pyarrow package: "
                         f"{_HUB_EXTRA}") from None
    try:
        columns = pq.read_schema(file).names
        _check_columns(columns, spec, str(file))
        table = pq.read_table(file, columns=list(_wanted(spec))).to_pydict()
    except (pyarrow.ArrowException, OSError) as exc:
        raise SweepError(f"{file} cannot be read as Parquet ({_first_line(exc)}): check the file") from None
    yield from _column_records(table)


def _column_records(columns: dict[str, list[Any]]) -> Records:
    names = list(columns)
    for i, values in enumerate(zip(*columns.values()), start=1):
        yield f"row {i}", dict(zip(names, values))


def _wanted(spec: TextData) -> tuple[str, ...]:
    return (*spec.text_fields, spec.label_field)


def _check_columns(columns: list[str], spec: TextData, where: str) -> None:
    missing = [c for c in _wanted(spec) if c not in columns]
    if missing:
        raise SweepError(
            f"{where} has the columns {columns}, but the study reads {missing}: "
            "set `data.text_fields` and `data.label_field` to its column names"
        )


def _text_of(value: Any) -> str | None:
    """A cell as text; None where it is missing (null, NaN, or an empty field)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a label column with a gap is read as floats (pandas): 1.0 is label 1
    text = str(value)
    return text if text.strip() else None


def _checked_rows(records: Records, spec: TextData, where: str) -> Rows:
    """The study's columns of every record, as text; one line for a split with no rows, or
    with rows that lack a label or a text."""
    rows: Rows = []
    gaps: dict[str, list[str]] = {}  # column -> where its value is missing
    for place, record in records:
        row = {}
        for column in _wanted(spec):
            value = _text_of(record.get(column))
            if value is None:
                gaps.setdefault(column, []).append(place)
            row[column] = value or ""
        rows.append(row)
    if not rows:
        raise SweepError(f"{where} has no rows: it needs one example per row, with the columns {_wanted(spec)}")
    if gaps:
        column, places = next(iter(gaps.items()))
        what = "label" if column == spec.label_field else "text"
        raise SweepError(f"{where} has {len(places)} row(s) with no {what} in `{column}` (the first at "
                         f"{places[0]}): fill them in or remove those rows")
    return rows


def _read_saved(folder: Path, spec: TextData) -> RawText:
    """A folder that ``datasets.DatasetDict.save_to_disk`` wrote: its splits by name."""
    if not (folder / _SAVED_SPLITS).is_file():
        raise SweepError(f"`data.path` {str(folder)!r} holds one data set saved with save_to_disk, without "
                         f"splits: save a DatasetDict with {spec.train!r} and {spec.test!r} splits instead")
    for split in (spec.train, spec.test):
        # datasets writes no data file for a split without rows, and then cannot read the folder back.
        if (folder / split).is_dir() and not any((folder / split).glob("*.arrow")):
            raise SweepError(f"the {split!r} split of {str(folder)!r} has no rows: it needs one example per "
                             f"row, with the columns {_wanted(spec)}")
    datasets = _import_datasets(f"`data.path` {str(folder)!r} was written by datasets' save_to_disk")
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:  # one bar per split and per worker, for a read of a few seconds at most
        datasets.disable_progress_bars()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - a damaged folder raises what its first bad file does
        raise SweepError(f"cannot read the saved data set {str(folder)!r} ({type(exc).__name__}: "
                         f"{_first_line(exc)}): save it again with save_to_disk") from None
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return _from_datasets(loaded, spec, repr(str(folder)))


def _from_datasets(loaded: Any, spec: TextData, where: str) -> RawText:
    """The study's splits of a ``datasets.DatasetDict``, and the names its label feature carries."""
    for split in (spec.train, spec.test):
        if split not in loaded:
            raise _missing_split(spec, split, list(loaded))
    train, test = loaded[spec.train], loaded[spec.test]
    _check_columns(list(train.column_names), spec, where)
    feature = train.features.get(spec.label_field)
    names = [str(n) for n in getattr(feature, "names", None) or []]  # a ClassLabel has names

    def rows(split: str, dataset: Any) -> Rows:
        _check_columns(list(dataset.column_names), spec, f"the {split!r} split of {where}")
        columns = dataset.select_columns(list(_wanted(spec))).to_dict()
        return _checked_rows(_column_records(columns), spec, f"the {split!r} split of {where}")

    return RawText(rows(spec.train, train), rows(spec.test, test), names, where)


def _missing_split(spec: TextData, split: str, splits: list[str]) -> SweepError:
    return SweepError(f"the data set {spec.path!r} has no split {split!r}, only {splits}: set "
                      "`data.train` and `data.test` to two of them")


def _import_datasets(what: str) -> Any:  # the datasets module
    try:
        import datasets  # optional: pip install 'sweeper[hub]'
    except ImportError:
        raise SweepError(
            f"{what}, but the `datasets` package is not installed: {_HUB_EXTRA}, or point `data.path` "
            "at a local folder of TSV, CSV, JSON Lines or Parquet files (e.g. --set data.path=../shared/data/sst2)"
        ) from None
    return datasets


@contextlib.contextmanager
def _hub_errors(spec: TextData) -> Iterator[None]:
    """One line, and at once, when the hub cannot be reached: without this, an offline machine
    prints the hub client's retries for about 25 s (measured here) before the data set fails."""
    import huggingface_hub.constants

    local = ("point `data.path` at a local folder of TSV, CSV, JSON Lines or Parquet files, e.g. "
             "--set data.path=../shared/data/sst2")
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        endpoint = huggingface_hub.constants.ENDPOINT
        reason = _unreachable(endpoint)
        if reason:
            raise SweepError(f"cannot reach the Hugging Face hub at {endpoint} for the data set {spec.path!r} "
                             f"({reason}): {local}; or, if it is in the local cache, set HF_HUB_OFFLINE=1")
    quiet = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    except SweepError:
        raise
    except Exception as exc:  # the hub raises many kinds; all mean "not to be had from here"
        raise SweepError(
            f"could not load the data set {spec.path!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {_first_line(exc)[:120]}): {local}"
        ) from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _unreachable(endpoint: str) -> str | None:
    """Why the hub's endpoint does not answer one request within 3 s; None when it answers.
    Through the hub client's own session, so a proxy the environment sets is used."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=3.0)
    except Exception as exc:  # noqa: BLE001 - the HTTP client's connect, timeout and DNS errors
        return f"{type(exc).__name__}: {_first_line(exc)[:80]}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- images


def check_image_folder(path: Path) -> None:
    """An image folder has train/ and test/, each with a folder per class, the same classes."""
    classes = {}
    for split in ("train", "test"):
        if not (path / split).is_dir():
            raise SweepError(f"`data.path` {str(path)!r} has no {split}/ folder: an image folder "
                             "needs train/<class>/*.png and test/<class>/*.png")
        classes[split] = sorted(p.name for p in (path / split).iterdir() if p.is_dir())
        if not classes[split]:
            raise SweepError(f"`data.path` {str(path)!r} has no class folders in {split}/: put each "
                             f"class's images in {split}/<class>/, e.g. {split}/cat/1.png")
    unknown = sorted(set(classes["test"]) - set(classes["train"]))
    if unknown:
        raise SweepError(f"{path / 'test'} has the classes {unknown}, which train/ has no folder for: "
                         "give train/ and test/ the same class folders")


def read_images(spec: ImageData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Train images and labels, test images and labels, and the class names: every image
    resized to ``spec.image_size`` square, RGB, uint8."""
    try:
        import torchvision  # optional: pip install 'sweeper[vision]'
        from PIL import Image
    except ImportError:
        raise SweepError(
            "image data needs torchvision: pip install 'sweeper[vision]'"
        ) from None
    path = Path(os.path.expanduser(spec.path))
    size = spec.image_size

    def to_array(images: Sequence[Any]) -> np.ndarray:
        out = np.zeros((len(images), size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            image = image if isinstance(image, Image.Image) else Image.fromarray(image)
            out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        return out

    if path.is_dir():
        check_image_folder(path)
        train_x, train_y, names = _image_split(path / "train", to_array, torchvision, Image)
        test_x, test_y, test_names = _image_split(path / "test", to_array, torchvision, Image)
        # ImageFolder numbers each folder's classes on its own: renumber test's by train's names.
        test_y = np.array([names.index(test_names[k]) for k in test_y], dtype=np.int64)
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


def _image_split(folder: Path, to_array: Callable[[Sequence[Any]], np.ndarray], torchvision: Any,
                 image_module: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split of an image folder: its images, labels and class names."""
    try:
        found = torchvision.datasets.ImageFolder(str(folder))
    except FileNotFoundError:  # a class folder without an image of a known type
        raise SweepError(f"{folder} has a class folder with no images (.png, .jpg, ...): add images or "
                         "remove the empty folder") from None
    try:
        pixels = to_array([image_module.open(p) for p, _ in found.samples])
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise SweepError(f"an image in {folder} cannot be read ({_first_line(exc)[:160]}): remove or "
                         "replace it") from None
    return pixels, np.array(found.targets, dtype=np.int64), list(found.classes)
