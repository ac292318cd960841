"""Reading a data set where it lies: TSV folders, the Hugging Face hub, image folders and
torchvision's data sets. Each failure is one line that says what to do."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.errors import SweepError

if TYPE_CHECKING:
    from sweeper.finetune.data._specs import ImageData, TextData

Rows = list[dict[str, str]]


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


def read_text(spec: TextData) -> tuple[Rows, Rows]:
    """The rows of the train and test splits, from a TSV folder or the hub."""
    path = Path(os.path.expanduser(spec.path))
    if path.is_dir():
        return _read_tsv(path, spec.train, spec), _read_tsv(path, spec.test, spec)
    if _looks_local(spec.path):
        raise _missing_folder(spec)
    return _read_hub(spec)


def check_text(spec: TextData) -> None:
    """Both TSV files there with the study's columns, or the hub data set reachable."""
    path = Path(os.path.expanduser(spec.path))
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


def _read_tsv(folder: Path, split: str, spec: TextData) -> Rows:
    with _open_tsv(folder, split, spec) as reader:
        return [row for row in reader if row.get(spec.label_field) not in (None, "")]


def _read_hub(spec: TextData, check_only: bool = False) -> tuple[Rows, Rows]:
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

    def rows(split: str) -> Rows:
        return [{k: str(v) for k, v in example.items()} for example in loaded[split]]

    return rows(spec.train), rows(spec.test)


# --------------------------------------------------------------------------- images


def check_image_folder(path: Path) -> None:
    """An image folder has train/ and test/, each with a folder per class."""
    for split in ("train", "test"):
        if not (path / split).is_dir():
            raise SweepError(f"`data.path` {str(path)!r} has no {split}/ folder: an image folder "
                             "needs train/<class>/*.png and test/<class>/*.png")


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

    def to_array(images: Any) -> np.ndarray:
        out = np.zeros((len(images), size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            image = image if isinstance(image, Image.Image) else Image.fromarray(image)
            out[i] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        return out

    if path.is_dir():
        check_image_folder(path)
        splits = []
        for split in ("train", "test"):
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
