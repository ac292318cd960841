"""One declaration per setting: the rule that checks it is the one its message and the docs state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from sweeper.finetune import rules
from sweeper.finetune.rules import Blocks, Flag, OneOf, Range, setting


@pytest.mark.parametrize(("rule", "good", "bad", "text"), [
    (Range(0, 1000, above=True, unit="passes"), [1e-3, 1000, 3], [0, -1, 1001, True, "3", None, math.nan],
     "a number of passes above 0 and at most 1000"),
    (Range(0, 1, below=True), [0, 0.5, 0.999], [1, 1.0, -0.1], "a number at least 0 and below 1"),
    (Range(1, 12, whole=True), [1, 12], [0, 13, 2.0, True], "1..12"),
    (Range(2, whole=True, unit="examples", none="all"), [2, None, 10**9], [1, 2.5], "a whole number of examples "
     "at least 2, or None for all"),
    (Range(whole=True), [0, -3], [1.5, False], "a whole number"),
    (OneOf(("random", "sentences")), ["random"], ["rows", None, 1], "one of random, sentences"),
    (Flag(), [True, False], ["yes", 1, None], "True or False"),
])
def test_a_rule_allows_what_its_text_says_and_no_more(rule, good, bad, text) -> None:  # type: ignore[no-untyped-def]
    assert rule.text == text
    assert all(rule.problem("x", value) is None for value in good)
    for value in bad:
        assert rule.problem("x", value) == f"`x` is {value!r}: use {text}"


def test_a_block_count_is_checked_only_once_the_model_is_known() -> None:
    assert Blocks().problem("unfreeze_depth", 99) is None  # no model yet
    assert Blocks().problem("unfreeze_depth", None, blocks=3) is None  # None: all of them
    assert Blocks(none=False).problem("unfreeze_depth", None, blocks=3) is not None
    assert Blocks().problem("unfreeze_depth", 4, blocks=3) == (
        "The value of `unfreeze_depth` is 4, but the model has 3 blocks: use 0..3")


@dataclass
class _Settings:
    name: str = field(metadata=rules.about("required, undocumented rule"))
    size: int = setting(8, "how many", Range(1, whole=True))
    mode: str = setting("a", "which", OneOf(("a", "b")))


def test_problems_lists_every_broken_rule_in_field_order_and_the_docs_list_every_setting() -> None:
    assert rules.problems(_Settings("n")) == []
    assert rules.problems(_Settings("n", 0, "c"), prefix="data.") == [
        "`data.size` is 0: use a whole number at least 1", "`data.mode` is 'c': use one of a, b"]
    doc = rules.markdown([("Settings", "Intro.", _Settings)])
    assert "| `name` | (required) |  | required, undocumented rule |" in doc
    assert "| `size` | `8` | a whole number at least 1 | how many |" in doc
