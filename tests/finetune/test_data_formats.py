"""Text data in every form a user brings it: TSV, CSV, JSON Lines and Parquet folders, folders
written by ``datasets.save_to_disk``; and every bad form of it, each one line (issues 18.10, 17.8)."""

from __future__ import annotations

import csv
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sweeper.errors import SweepError
from sweeper.finetune.data import ImageData, PreparedData, TextData, check_source, prepare, synthetic_sentiment
from sweeper.finetune.model_specs import TinyTextClassifier

# One xdist worker runs this file's tests, so the tokenizer fixture is built once.
pytestmark = pytest.mark.xdist_group("finetune_data")

FORMATS = ("tsv", "csv", "jsonl", "parquet", "saved")
Rows = list[dict[str, Any]]


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path) -> Any:
    return TinyTextClassifier(layers=2, hidden=32, heads=2).tokenizer(model_cache)


def write_split(folder: Path, kind: str, name: str, rows: Rows, columns: tuple[str, ...] = ("sentence", "label")) -> None:
    """``rows`` as ``folder/<name>.<kind>``, as a user's own tools would write them."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tsv":
        lines = ["\t".join(columns)] + ["\t".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    elif kind == "csv":
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, list(columns))
            writer.writeheader()
            writer.writerows({c: r.get(c) for c in columns} for r in rows)
    elif kind == "jsonl":
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({c: r.get(c) for c in columns}) + "\n" for r in rows))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), folder / f"{name}.parquet")
    else:
        raise ValueError(kind)


def write_saved(folder: Path, splits: dict[str, Rows], names: list[str] | None = None) -> Path:
    """A ``DatasetDict`` saved with ``save_to_disk``; its labels a ClassLabel when ``names``."""
    import datasets

    label = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"sentence": datasets.Value("string"), "label": label})
    datasets.disable_progress_bars()
    datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in rows],
                                          "label": [int(r["label"]) for r in rows]}, features=features)
        for name, rows in splits.items()
    }).save_to_disk(str(folder))
    return folder


def task(n_train: int = 80, n_test: int = 20) -> tuple[Rows, Rows]:
    """The generated task, with integer labels, and a comma and quotes in one sentence (which
    CSV must quote and TSV carries raw)."""
    train, test = synthetic_sentiment(n_train, n_test, seed=3)
    rows = [[{"sentence": r["sentence"], "label": int(r["label"])} for r in split] for split in (train, test)]
    rows[0][0]["sentence"] = 'the "film", quite good'
    return rows[0], rows[1]


def write_folder(folder: Path, kind: str, train: Rows, test: Rows, names: list[str] | None = None) -> Path:
    if kind == "saved":
        return write_saved(folder, {"train": train, "validation": test}, names)
    write_split(folder, kind, "train", train)
    write_split(folder, kind, "validation", test)
    return folder


def arrays(data: PreparedData) -> list[list[int]]:
    return [np.asarray(a).tolist() for split in (data.train, data.validation, data.test)
            for a in (split.input_ids, split.offsets, split.labels)]


@pytest.mark.parametrize("kind", FORMATS[1:])
def test_every_format_gives_the_examples_the_tsv_gives(tmp_path: Path, tokenizer: Any, kind: str) -> None:
    train, test = task()
    tsv = prepare(TextData(str(write_folder(tmp_path / "tsv", "tsv", train, test))), tmp_path / "c", 0, tokenizer, "t")
    spec = TextData(str(write_folder(tmp_path / kind, kind, train, test)))
    check_source(spec)
    data = prepare(spec, tmp_path / "c", 0, tokenizer, "t")
    assert data.sizes() == tsv.sizes() == {"train": 76, "validation": 4, "test": 20}
    assert arrays(data) == arrays(tsv)  # the same tokens, the same labels, the same carve-out
    assert tokenizer.decode(data.train.input_ids[: data.train.offsets[-1]], skip_special_tokens=True).count('"') \
        == tokenizer.decode(tsv.train.input_ids[: tsv.train.offsets[-1]], skip_special_tokens=True).count('"')


def test_label_names_come_from_the_study_then_the_data_then_the_labels(tmp_path: Path, tokenizer: Any) -> None:
    train, test = task()
    saved = write_saved(tmp_path / "saved", {"train": train, "validation": test}, ["bad", "good"])
    assert prepare(TextData(str(saved)), tmp_path / "c", 0, tokenizer, "t").label_names == ["bad", "good"]
    named = TextData(str(saved), label_names=("negative", "positive"))
    assert prepare(named, tmp_path / "c", 0, tokenizer, "t").label_names == ["negative", "positive"]
    tsv = write_folder(tmp_path / "tsv", "tsv", train, test)
    assert prepare(TextData(str(tsv)), tmp_path / "c", 0, tokenizer, "t").label_names == ["0", "1"]
    words = [[{**r, "label": ["neg", "pos"][r["label"]]} for r in split] for split in (train, test)]
    jsonl = write_folder(tmp_path / "words", "jsonl", words[0], words[1])
    data = prepare(TextData(str(jsonl)), tmp_path / "c", 0, tokenizer, "t")
    assert data.label_names == ["neg", "pos"]
    assert data.test.labels.tolist() == [r["label"] for r in test]  # "pos" is class 1, as 1 was
    ordered = prepare(TextData(str(jsonl), label_names=("pos", "neg")), tmp_path / "c", 0, tokenizer, "t")
    assert ordered.test.labels.tolist() == [1 - r["label"] for r in test]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bad(tmp: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> TextData:
    """A data folder (or setting) that is wrong in the way ``case`` names."""
    train, test = task(20, 5)
    folder = tmp / "d"
    if case == "empty tsv":
        write_split(folder, "tsv", "validation", test)
        (folder / "train.tsv").write_text("")
    elif case == "header only csv":
        write_folder(folder, "csv", [], test)
    elif case == "parquet without rows":
        write_folder(folder, "parquet", train, [])
    elif case == "jsonl of blank lines":
        write_split(folder, "jsonl", "validation", test)
        (folder / "train.jsonl").write_text("\n\n")
    elif case == "saved split without rows":
        write_saved(folder, {"train": train, "validation": []})
    elif case == "columns missing":
        write_split(folder, "csv", "train", train, columns=("text", "label"))
        write_split(folder, "csv", "validation", test, columns=("text", "label"))
    elif case == "label missing in tsv":
        write_folder(folder, "tsv", [*train[:3], {"sentence": "no label here"}, *train[3:]], test)
    elif case == "label null in parquet":
        write_folder(folder, "parquet", [*train, {"sentence": "a film", "label": None}], test)
    elif case == "text null in jsonl":
        write_folder(folder, "jsonl", [*train, {"sentence": None, "label": 1}], test)
    elif case == "a line that is not json":
        write_folder(folder, "jsonl", train, test)
        (folder / "train.jsonl").write_text((folder / "train.jsonl").read_text() + "{sentence: 1}\n")
    elif case == "not utf-8":
        write_folder(folder, "csv", train, test)
        (folder / "train.csv").write_bytes("sentence,label\ncaf\xe9 ,1\n".encode("latin-1"))
    elif case == "two types of split":
        write_split(folder, "csv", "train", train)
        write_split(folder, "tsv", "validation", test)
    elif case == "two files of one split":
        write_folder(folder, "csv", train, test)
        write_split(folder, "tsv", "train", train)
    elif case == "a file, not a folder":
        write_folder(folder, "csv", train, test)
        return TextData(str(folder / "train.csv"))
    elif case == "one saved data set without splits":
        import datasets

        datasets.Dataset.from_dict({"sentence": ["a"], "label": [1]}).save_to_disk(str(folder))
    elif case == "saved without the test split":
        write_saved(folder, {"train": train, "test": test})
    elif case == "one class":
        write_folder(folder, "tsv", [{**r, "label": 1} for r in train], test)
    elif case == "unlabelled split":
        write_folder(folder, "parquet", [{**r, "label": -1} for r in train], test)
    elif case == "a test label never trained on":
        write_folder(folder, "csv", train, [*test, {"sentence": "a film", "label": 7}])
    elif case == "validation leaves no training row":
        write_folder(folder, "csv", train[:2], test)
        return TextData(str(folder), validation_fraction=0.9)
    elif case == "too few label names":
        write_folder(folder, "csv", train, test)
        return TextData(str(folder), label_names=("good",))
    elif case == "pyarrow not installed":
        write_folder(folder, "parquet", train, test)
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    elif case == "datasets not installed":
        write_saved(folder, {"train": train, "validation": test})
        monkeypatch.setitem(sys.modules, "datasets", None)
    elif case == "hub unreachable":
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
        return TextData("glue/sst2")
    else:
        raise ValueError(case)
    return TextData(str(folder))


BAD = {
    "empty tsv": "train.tsv is empty: it needs a header",
    "header only csv": "train.csv has no rows",
    "parquet without rows": "validation.parquet has no rows",
    "jsonl of blank lines": "train.jsonl has no rows",
    "saved split without rows": "the 'validation' split of .* has no rows",
    "columns missing": r"has the columns \['text', 'label'\], but the study reads \['sentence'\]",
    "label missing in tsv": r"train.tsv has 1 row\(s\) with no label in `label` \(the first at line 5\)",
    "label null in parquet": r"with no label in `label` \(the first at row 21\)",
    "text null in jsonl": r"with no text in `sentence` \(the first at line 21\)",
    "a line that is not json": "line 21 of .*train.jsonl is not JSON",
    "not utf-8": "train.csv is not UTF-8 text",
    "two types of split": "holds train.csv but validation.tsv: save both splits as one type",
    "two files of one split": "holds train.tsv and train.csv: keep one type of file",
    "a file, not a folder": "a file: point it at the folder that holds train and validation files",
    "one saved data set without splits": "without splits: save a DatasetDict",
    "saved without the test split": r"has no split 'validation', only \['train', 'test'\]",
    "one class": "has only the label '1': a classifier needs two classes",
    "unlabelled split": "has the label -1, but integer labels are the classes 0, 1",
    "a test label never trained on": "the test split of .* has the label '7', which the training split never uses",
    "validation leaves no training row": "has 2 row.*holds out 2 of them for validation, which leaves none to train on",
    "too few label names": r"go up to 1, but 1 label names are given \(\['good'\]\)",
    "pyarrow not installed": r"needs the pyarrow package: pip install 'sweeper\[hub\]'",
    "datasets not installed": r"save_to_disk, but the `datasets` package is not installed: pip install 'sweeper\[hub\]'",
    "hub unreachable": r"cannot reach the Hugging Face hub at http://127.0.0.1:\d+ for the data set 'glue/sst2'",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_text_data_is_one_line_from_check_and_prepare(tmp_path: Path, tokenizer: Any, case: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _bad(tmp_path, case, monkeypatch)
    steps: list[Callable[[], object]] = [lambda: check_source(spec)]
    if case != "hub unreachable":  # launch reads the files once more, through prepare
        steps.append(lambda: prepare(spec, tmp_path / "cache", 0, tokenizer, "t"))
    for step in steps:
        started = time.monotonic()
        with pytest.raises(SweepError, match=BAD[case]) as raised:
            step()
        assert "\n" not in str(raised.value)
        assert time.monotonic() - started < 5  # the hub's retries took 25 s here


def test_an_image_folder_whose_test_classes_train_lacks_is_refused(tmp_path: Path, image_folder) -> None:  # type: ignore[no-untyped-def]
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder(8), folder)
    (folder / "test" / "red").rename(folder / "test" / "green")
    with pytest.raises(SweepError, match=r"has the classes \['green'\], which train/ has no folder for"):
        check_source(ImageData(str(folder)))


def test_an_image_folder_reads_test_classes_by_name_and_refuses_unreadable_images(  # type: ignore[no-untyped-def]
        tmp_path: Path, image_folder) -> None:
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder(8), folder)
    shutil.rmtree(folder / "test" / "blue")  # test/ has red only: ImageFolder alone would call it class 0
    data = prepare(ImageData(str(folder), image_size=16), tmp_path / "cache", seed=0)
    assert data.label_names == ["blue", "red"] and set(data.test.labels.tolist()) == {1}
    (folder / "train" / "red" / "0.png").write_bytes(b"not a png")
    with pytest.raises(SweepError, match="an image in .*train cannot be read"):
        prepare(ImageData(str(folder), image_size=16), tmp_path / "cache2", seed=0)


def test_the_saved_model_names_its_classes(tmp_path: Path, model_cache: Path) -> None:
    from transformers import AutoConfig

    from sweeper.finetune.model_specs import ImageClassifier
    from sweeper.finetune.models import from_checkpoint

    text = TinyTextClassifier(layers=1, hidden=32, heads=2).build(2, model_cache, label_names=["neg", "pos"])
    text.save(tmp_path / "text")
    config = AutoConfig.from_pretrained(tmp_path / "text")
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    image = ImageClassifier("resnet18", weights="none").build(2, tmp_path, label_names=["blue", "red"])
    image.save(tmp_path / "image")
    assert from_checkpoint(tmp_path / "image").label_names == ["blue", "red"]  # type: ignore[attr-defined]
    unnamed = TinyTextClassifier(layers=1, hidden=32, heads=2).build(3, model_cache, label_names=["a", "b"])
    assert unnamed.model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}  # not one name per class
