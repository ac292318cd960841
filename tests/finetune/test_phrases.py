"""The leak-free validation split of phrase-level data, on the real SST-2 training split."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from sweeper.finetune import phrases
from sweeper.finetune.data import synthetic_sentiment
from tests.helpers import SST2

pytestmark = pytest.mark.xdist_group("finetune_data")


@pytest.fixture(scope="module")
def sst2_train() -> list[str]:
    with open(SST2 / "train.tsv", newline="", encoding="utf-8") as handle:
        return [row["sentence"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _inside(text: str, others: list[str]) -> bool:
    """``text`` word for word inside one of ``others`` (the test's own slow check)."""
    pattern = re.compile(r"(^| )" + re.escape(" ".join(text.split())) + r"( |$)")
    return any(pattern.search(" ".join(o.split())) for o in others)


def test_sentences_split_leaves_nothing_of_validation_in_training(sst2_train: list[str]) -> None:
    train, validation, whole = phrases.sentence_split(sst2_train, 0.05, seed=0)
    assert sorted(np.concatenate([train, validation]).tolist()) == list(range(len(sst2_train)))
    assert set(whole.tolist()) <= set(validation.tolist())
    train_texts = [sst2_train[i] for i in train]
    joined = "\n".join(" " + " ".join(t.split()) + " " for t in train_texts)
    for i in validation:  # not a validation example is inside a training one, nor is one
        assert " " + " ".join(sst2_train[i].split()) + " " not in joined, sst2_train[i]
    # About 5% of the examples; 5% of the treebank's sentences, as long as SST-2 validation's.
    assert 0.04 * len(sst2_train) < len(validation) < 0.06 * len(sst2_train)
    assert 300 <= len(whole) <= 400 and np.mean([len(sst2_train[i].split()) for i in whole]) > 15
    sentences = [sst2_train[i] for i in whole]
    for i in np.random.default_rng(0).choice(validation, 40, replace=False):  # the rest: phrases of them
        assert _inside(sst2_train[i], sentences)
    again = phrases.sentence_split(sst2_train, 0.05, seed=0)
    other = phrases.sentence_split(sst2_train, 0.05, seed=1)
    assert again[1].tolist() == validation.tolist() and again[0].tolist() == train.tolist()
    assert other[1].tolist() != validation.tolist()


def test_phrase_level_data_is_told_from_sentences_and_from_copies(sst2_train: list[str]) -> None:
    assert phrases.phrase_share(sst2_train, seed=0) > 0.8  # most examples lie inside others
    assert phrases.looks_phrase_level(sst2_train, seed=0)
    with open(SST2 / "validation.tsv", newline="", encoding="utf-8") as handle:
        sentences = [row["sentence"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert not phrases.looks_phrase_level(sentences, seed=0)  # whole sentences
    generated, _ = synthetic_sentiment(500, 10, seed=0)
    assert not phrases.looks_phrase_level([row["sentence"] for row in generated], seed=0)
    assert not phrases.looks_phrase_level(["good", "bad"] * 20, seed=0)  # copies are not phrases
