"""A validation split without leaks for phrase-level training data (GLUE SST-2).

SST-2's training split is every labelled phrase of the Stanford Sentiment Treebank's parse
trees (67,349 phrases of about 6,900 sentences), while its validation split holds whole
sentences only. A validation split carved at random from such data leaks: of a random 5% of
SST-2 train, 886 in 1,000 phrases occur word for word inside a training phrase, so the
sweep's validation figure partly measures remembering (on the H100 run of issue 7, 0.948 on
such a split against 0.891 on SST-2 validation for the same model).

The leak-free split holds out whole *sentences* (examples that no other example contains),
chosen at random, each with every phrase of it that no training sentence contains, so that
nothing the sweep validates on was seen in training, whole or as part of a longer example.
The phrases stay in validation rather than being dropped: a few hundred sentences alone
would be a noisy figure to select on.

What it buys, measured (``bench/validation_split.py``, bench/README.md): an honest figure,
within 1 to 2 points of SST-2 validation where a random split's is 6 to 7.5 points above it.
What it costs: a held-out tree's phrases move together, so the same share of examples holds
far fewer independent ones, and on a CPU-sized run the random split ranked trials better.
Hence it is a choice (``TextData(validation_split="sentences")``), not the default.

Containment is word for word, on whitespace-separated words (SST-2's phrases are tokenised
that way). Every contiguous run of words of every sentence is hashed once: about 1.5 million
runs for all of SST-2 train, a few seconds and under 200 MB, paid once per study when the
data is prepared.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from sweeper.errors import SweepError

# Data is phrase-level when at least this share of sampled examples lies inside others.
PHRASE_SHARE = 0.25
SAMPLE = 200  # examples sampled to measure that share (about 0.5 s for SST-2's 67,349)
MAX_EXAMPLES = 300_000  # larger data is not searched (each sampled example scans all of it)
MAX_WORDS = 64  # longer texts (documents, not phrases) are never phrase-level
MAX_RUNS = 30_000_000  # word runs hashed at most: beyond, the data is not phrase-level


def phrase_hashes(words: Sequence[str]) -> set[int]:
    """Hashes of every contiguous run of ``words``: every phrase a sentence contains."""
    return {hash(" ".join(words[start:end])) for start in range(len(words)) for end in range(start + 1, len(words) + 1)}


def phrase_share(texts: Sequence[str], seed: int) -> float:
    """The share of (up to ``SAMPLE``) examples that occur inside a longer example."""
    if not 2 <= len(texts) <= MAX_EXAMPLES:
        return 0.0
    normal = [" ".join(t.split()) for t in texts]
    copies = Counter(normal)
    joined = "\n".join(" " + t + " " for t in normal)
    sample = random.Random(seed).sample(range(len(texts)), min(SAMPLE, len(texts)))
    # Each copy of itself is one occurrence; any more are inside longer examples. Duplicated
    # texts alone do not make data phrase-level.
    inside = sum(1 for i in sample if normal[i] and joined.count(" " + normal[i] + " ") > copies[normal[i]])
    return inside / len(sample)


def looks_phrase_level(texts: Sequence[str], seed: int) -> bool:
    """True for data like SST-2 train: short examples, many of them parts of others."""
    if not texts:
        return False
    lengths = sorted(len(t.split()) for t in texts)
    if lengths[len(lengths) // 2] > MAX_WORDS:
        return False
    return phrase_share(texts, seed) >= PHRASE_SHARE


def sentences(texts: Sequence[str]) -> list[int]:
    """Indices of the sentences of ``texts``: the examples that no other example contains."""
    return _sentences([t.split() for t in texts])[0]


def _sentences(words: list[list[str]]) -> tuple[list[int], Counter[int]]:
    """The sentences, and for every phrase hash how many sentences contain it."""
    holders: Counter[int] = Counter()
    found: list[int] = []
    for i in sorted(range(len(words)), key=lambda i: -len(words[i])):  # longest first
        if hash(" ".join(words[i])) in holders:
            continue  # inside a longer example (or a copy of one): not a sentence
        found.append(i)
        holders.update(phrase_hashes(words[i]))
        if len(holders) > MAX_RUNS:
            raise SweepError(f"the training texts are too long to split by sentences ({MAX_RUNS:,} word runs "
                             "and more): set `data.validation_split` to 'random'")
    return found, holders


def sentence_split(texts: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (train, validation, whole sentences) index arrays of a leak-free split of ``texts``.

    A random ``fraction`` of the sentences (examples no other example contains) is held out,
    and with each every example inside it that lies inside no training sentence: validation
    is those sentences and those phrases of them, about ``fraction`` of the examples. The
    third array is the held-out sentences alone (a part of validation).
    """
    words = [t.split() for t in texts]  # once: every step below reads them
    found, holders = _sentences(words)
    n_held = max(1, int(round(len(found) * fraction)))
    whole = sorted(random.Random(seed).sample(found, min(n_held, len(found))))
    held: Counter[int] = Counter()
    for i in whole:
        held.update(phrase_hashes(words[i]))
    validation: list[int] = []
    train: list[int] = []
    for i, w in enumerate(words):
        key = hash(" ".join(w))
        # Inside held-out sentences only: training on it would show the model part of one.
        (validation if held[key] and held[key] == holders[key] else train).append(i)
    # Shuffled, as a random split's training part is (max_train_samples takes a prefix).
    train_idx = np.array(train, dtype=np.int64)[np.random.default_rng(seed).permutation(len(train))]
    return train_idx, np.array(validation, dtype=np.int64), np.array(whole, dtype=np.int64)
