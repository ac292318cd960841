from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from sweeper.errors import SweepError
from sweeper.finetune.data import TextData, evaluation_batches, prepare, training_batches
from tests.helpers import SST2

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("finetune_data")


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):  # type: ignore[no-untyped-def]
    return minilm_tokenizer


def _tsv_folder(folder: Path, train: list[tuple[str, str]], test: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", test)):
        (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows))
    return folder


def test_sst2_validation_is_carved_from_train_and_glue_validation_is_test(tmp_path: Path, tokenizer, caplog) -> None:  # type: ignore[no-untyped-def]
    spec = TextData(str(SST2), validation_fraction=0.01, max_train_samples=2000)
    with caplog.at_level(logging.WARNING, logger="sweeper.finetune.data"):
        data = prepare(spec, tmp_path, seed=0, tokenizer=tokenizer, tokenizer_id="minilm")
    # A random split of phrase-level data is allowed, with one line that says what it costs.
    [warning] = [r.getMessage() for r in caplog.records if r.name == "sweeper.finetune.data"]
    assert "flatters" in warning and "validation_split='sentences'" in warning
    assert len(data.test) == 872  # GLUE SST-2 validation, held out
    assert len(data.validation) == round(67349 * 0.01)
    assert len(data.train) == 2000
    assert data.num_labels == 2
    batch = data.test.batch(np.arange(4), device=__import__("torch").device("cpu"))
    assert batch["input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 4


def test_the_split_is_seeded_and_disjoint(tmp_path: Path, tokenizer, caplog) -> None:  # type: ignore[no-untyped-def]
    rows = [(f"sentence number {i}", str(i % 2)) for i in range(200)]
    folder = _tsv_folder(tmp_path / "d", rows, rows[:10])
    spec = TextData(str(folder), validation_fraction=0.25)

    def sentences(split) -> set[str]:  # type: ignore[no-untyped-def]
        return {tokenizer.decode(split.input_ids[a:b], skip_special_tokens=True)
                for a, b in zip(split.offsets[:-1], split.offsets[1:])}

    with caplog.at_level(logging.WARNING, logger="sweeper.finetune.data"):
        first = prepare(spec, tmp_path / "c1", 1, tokenizer, "minilm")
    assert not caplog.records  # whole sentences: nothing to warn about
    again = prepare(spec, tmp_path / "c2", 1, tokenizer, "minilm")
    other = prepare(spec, tmp_path / "c3", 2, tokenizer, "minilm")
    assert len(first.validation) == 50 and len(first.train) == 150
    assert not sentences(first.train) & sentences(first.validation)
    assert sentences(first.validation) == sentences(again.validation)
    assert sentences(first.validation) != sentences(other.validation)


def test_tokenisation_happens_once_and_is_then_read_from_the_cache(tmp_path: Path, tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder = _tsv_folder(tmp_path / "d", [("good", "1"), ("bad", "0")] * 20, [("fine", "1")])
    spec = TextData(str(folder))
    prepare(spec, tmp_path / "cache", 0, tokenizer, "minilm")
    calls = []
    monkeypatch.setattr(TextData, "write_cache", lambda *a: calls.append(a))
    again = prepare(spec, tmp_path / "cache", 0, tokenizer, "minilm")
    assert not calls and len(again.train) + len(again.validation) == 40


def test_missing_files_and_columns_are_clear_errors(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SweepError, match="has no train.tsv"):
        prepare(TextData(str(tmp_path)), tmp_path / "c", 0, tokenizer, "t")
    folder = _tsv_folder(tmp_path / "d", [("a", "1")] * 5, [("b", "0")])
    with pytest.raises(SweepError, match="set `data.text_fields`"):
        prepare(TextData(str(folder), text_fields=("text",)), tmp_path / "c", 0, tokenizer, "t")


def test_length_buckets_cover_every_example_once_with_little_padding() -> None:
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    batches = training_batches(lengths, batch_size=16, seed=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    padding = sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches)
    random_padding = sum(int(lengths[b].max() * len(b) - lengths[b].sum())
                         for b in np.array_split(np.random.default_rng(1).permutation(1000), len(batches)))
    assert padding < random_padding / 5
    assert [b.tolist() for b in training_batches(lengths, 16, seed=3)] == [b.tolist() for b in batches]
    assert sorted(np.concatenate(evaluation_batches(lengths, 64)).tolist()) == list(range(1000))


def test_a_sentences_split_holds_out_whole_sentences_with_their_phrases(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    # 40 treebank-like sentences of 7 words, each with phrases of its own and shared ones,
    # as SST-2's training split has them.
    sentences = [f"the {adjective} film about {topic} works {i}" for i, (adjective, topic) in
                 enumerate([("slow", "war"), ("bright", "love"), ("odd", "jazz"), ("dull", "time")] * 10)]
    spans = [(0, 7), (1, 3), (3, 7), (4, 6)]  # the sentence, "slow film", "about war works 0", "war works"
    rows = [(" ".join(s.split()[a:b]), str(i % 2)) for i, s in enumerate(sentences) for a, b in spans]
    folder = _tsv_folder(tmp_path / "d", rows, rows[:4])

    def texts(split) -> list[str]:  # type: ignore[no-untyped-def]
        return [tokenizer.decode(split.input_ids[a:b], skip_special_tokens=True)
                for a, b in zip(split.offsets[:-1], split.offsets[1:])]

    data = prepare(TextData(str(folder), validation_fraction=0.1, validation_split="sentences"),
                   tmp_path / "c", 0, tokenizer, "minilm")
    held, trained = texts(data.validation), texts(data.train)
    whole = [t for t in held if len(t.split()) == 7]
    assert len(whole) == 4 and len(held) == 8  # 10% of the sentences, each with its phrase of its own
    assert all(any(f" {t} " in f" {w} " for w in whole) for t in held)
    assert not any(f" {t} " in f" {u} " for t in held for u in trained)  # nothing of them in training
    assert len(held) + len(trained) == len(rows)


def test_validation_split_names_a_known_way_that_fits_the_data() -> None:
    assert TextData().check() == [] and TextData(validation_split="sentences").check() == []
    [problem] = TextData(validation_split="rows").check()
    assert "`data.validation_split` is 'rows': use one of random, sentences" in problem
    [problem] = TextData(text_fields=("premise", "hypothesis"), validation_split="sentences").check()
    assert "sentence pairs: use 'random'" in problem
