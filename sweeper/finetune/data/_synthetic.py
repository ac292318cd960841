"""The generated sentiment task: offline, small, and learnable in seconds."""

from __future__ import annotations

import random

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
