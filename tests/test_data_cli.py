"""A user's own data through the real CLI: CSV, JSON Lines, Parquet and a saved `datasets`
folder each swept, the best folder's pipeline answering in the data's label names (issue
18.2, 18.10), and bad data one line with exit code 2 from `validate` and `launch` (17.8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.finetune.test_data_formats import _closed_port, task, write_folder
from tests.helpers import run_cli, write_study

# Each format's own label scheme, and the names the exported model must answer with (the two
# not exported here are checked in tests/finetune/test_data_formats.py, without a sweep).
FORMATS = {
    "csv": ("words", "", ["neg", "pos"]),  # a string label column: its strings
    "jsonl": ("integers", 'label_names=("negative", "positive"), ', ["negative", "positive"]),  # the study's names
    "parquet": ("integers", "", ["0", "1"]),  # plain integer labels: the labels themselves
    "saved": ("class label", "", ["bad", "good"]),  # a ClassLabel's names, as SST-2 on the hub has
}
EXPORTED = ("csv", "saved")

STUDY = """
    from sweeper import Sweep, TextData, TinyTextClassifier

    sweep = Sweep(
        name="own-data",
        model=TinyTextClassifier(layers=1, hidden=32, heads=2),
        data=TextData("DATA", SETTINGSmax_length=32),
        space={"learning_rate": 3e-3, "unfreeze_depth": 1, "batch_size": 16},
        epochs=1,
        evals_per_epoch=1,
        n_trials=2,
        output_dir="OUTPUT_DIR",
    )
"""


def _study(tmp_path: Path, data: Path, settings: str = "") -> Path:
    return write_study(tmp_path, STUDY.replace("DATA", str(data)).replace("SETTINGS", settings))


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(300)  # 10 to 16 s of CPU (launch, its worker; best and a pipeline where exported)
@pytest.mark.parametrize("kind", list(FORMATS))
def test_each_format_is_swept_and_its_best_model_answers_in_the_data_labels(tmp_path: Path, kind: str) -> None:
    labels, settings, names = FORMATS[kind]
    train, test = task(120, 30)
    if labels == "words":
        train, test = ([{**r, "label": names[r["label"]]} for r in split] for split in (train, test))
    folder = write_folder(tmp_path / kind, kind, train, test, names if labels == "class label" else None)
    study = _study(tmp_path, folder, settings)
    launched = run_cli("launch", str(study), "--workers", "1")
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "2/2 done" in launched.stderr and "best trial" in launched.stderr, launched.stderr[-2000:]
    if kind not in EXPORTED:
        return
    exported = run_cli("best", str(study), "--out", str(tmp_path / "best"))
    assert exported.returncode == 0, exported.stderr[-2000:]

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(tmp_path / "best"), device="cpu")
    answers = classify(["a great and lovely film", "a dull and boring film"])
    assert {a["label"] for a in answers} <= set(names), answers  # never LABEL_0 / LABEL_1
    assert classify.model.config.id2label == dict(enumerate(names))


def _empty_tsv(tmp_path: Path) -> Path:
    folder = write_folder(tmp_path / "data", "tsv", *task(20, 5))
    (folder / "train.tsv").write_text("")
    return _study(tmp_path, folder)


@pytest.mark.parametrize("command, data, env, message", [
    ("validate", "empty tsv", {}, "train.tsv is empty"),
    ("validate", "hub", {"HF_ENDPOINT": "http://127.0.0.1:PORT"}, "cannot reach the Hugging Face hub at http://127.0.0.1"),
    ("launch", "hub", {"HF_HUB_OFFLINE": "1"}, "could not load the data set 'glue/sst2' from the Hugging Face hub"),
])
# `launch` reads local files through `prepare`, which test_data_formats.py checks case by case;
# here, each command's own path once.
def test_bad_data_is_one_line_and_exit_code_2(tmp_path: Path, command: str, data: str, env: dict[str, str],
                                              message: str) -> None:
    study = _empty_tsv(tmp_path) if data == "empty tsv" else _study(tmp_path, Path("glue/sst2"))
    env = {k: v.replace("PORT", str(_closed_port())) for k, v in env.items()}
    result = run_cli(command, str(study), env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    # One error line after launch's progress lines, and no traceback or hub retries before it.
    errors = [line for line in result.stderr.splitlines() if line.startswith("sweeper: error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert all(line.startswith("sweeper: ") for line in result.stderr.splitlines() if line.strip()), result.stderr
    assert not (tmp_path / "out" / "study.db").exists()  # nothing was created
