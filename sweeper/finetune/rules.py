"""Every setting declared once: its default, its one-line description and its rule.

A study's dataclasses (``Sweep``, ``Hyper``, the model and data specs) declare each field
with :func:`setting`, and that one declaration drives the check (:func:`problems`), the
one-line message of a bad value ("`epochs` is 0: use a number of passes above 0 and at most
1000") and ``docs/settings.md`` (:func:`markdown`), so the three cannot disagree (issue 15).
A rule states what the check enforces; what a study would typically search lives in the
description ("typically 1e-6..1e-3").

Checks that relate two settings (a metric and its direction, a width and its head count)
stay with the class that has both; this module knows nothing of what the settings mean.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Rule(Protocol):
    @property
    def text(self) -> str:
        """What is allowed, as docs/settings.md and the message state it."""
        ...

    def problem(self, key: str, value: Any, blocks: int | None = None) -> str | None:
        """The one-line problem of ``value`` for the setting ``key``, or None when it is fine.
        ``blocks`` is the model's block count, where it is known (a rule may need it)."""
        ...


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """A number between optional bounds, each included unless ``above``/``below`` says not."""

    low: float | None = None
    high: float | None = None
    whole: bool = False  # an int (a bool is not one)
    above: bool = False  # low itself is excluded
    below: bool = False  # high itself is excluded
    unit: str = ""  # what is counted: "passes", "tokens"
    none: str = ""  # None is allowed too, and means this ("all", "no limit")

    @property
    def text(self) -> str:
        if self.low is not None and self.high is not None and not (self.above or self.below):
            bounds = f"{self.low:g}..{self.high:g}" + (f" {self.unit}" if self.unit else "")
        else:
            parts = []
            if self.low is not None:
                parts.append(f"{'above' if self.above else 'at least'} {self.low:g}")
            if self.high is not None:
                parts.append(f"{'below' if self.below else 'at most'} {self.high:g}")
            noun = ("a whole number" if self.whole else "a number") + (f" of {self.unit}" if self.unit else "")
            bounds = " ".join([noun, " and ".join(parts)]) if parts else noun
        return bounds + (f", or None for {self.none}" if self.none else "")

    def allows(self, value: Any) -> bool:
        if value is None:
            return bool(self.none)
        if not (_whole(value) if self.whole else _number(value)) or math.isnan(value):
            return False
        # Written so that a bound fails unless the value is on its allowed side.
        if self.low is not None and not (value > self.low if self.above else value >= self.low):
            return False
        return self.high is None or bool(value < self.high if self.below else value <= self.high)

    def problem(self, key: str, value: Any, blocks: int | None = None) -> str | None:
        return None if self.allows(value) else f"`{key}` is {value!r}: use {self.text}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed list of names."""

    choices: tuple[str, ...]

    @property
    def text(self) -> str:
        return "one of " + ", ".join(self.choices)

    def problem(self, key: str, value: Any, blocks: int | None = None) -> str | None:
        return None if isinstance(value, str) and value in self.choices else f"`{key}` is {value!r}: use {self.text}"


@dataclass(frozen=True)
class Flag:
    """True or False, and nothing that merely looks like one."""

    @property
    def text(self) -> str:
        return "True or False"

    def problem(self, key: str, value: Any, blocks: int | None = None) -> str | None:
        return None if isinstance(value, bool) else f"`{key}` is {value!r}: use {self.text}"


@dataclass(frozen=True)
class Kinds:
    """An instance of one of the classes of a union: a study's model or data spec."""

    union: Any  # e.g. TextData | SyntheticText | ImageData

    @property
    def text(self) -> str:
        names = [kind.__name__ for kind in typing.get_args(self.union)]
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]

    def problem(self, key: str, value: Any, blocks: int | None = None) -> str | None:
        return None if isinstance(value, self.union) else f"`{key}` is {value!r}: use {self.text}"


@dataclass(frozen=True)
class Check:
    """A rule no range states: ``test`` decides, ``advice`` follows the colon of the message."""

    test: Callable[[Any], bool]
    text: str  # what is allowed, for docs/settings.md
    advice: str  # what to do, for the message

    def problem(self, key: str, value: Any, blocks: int | None = None) -> str | None:
        return None if self.test(value) else f"`{key}` is {value!r}: {self.advice}"


@dataclass(frozen=True)
class Blocks:
    """A block count of the model, 0..its blocks: checked once the model's config has been
    read, since only then is its block count known."""

    none: bool = True  # None is allowed too, and means all of them

    @property
    def text(self) -> str:
        return "0..the model's blocks" + (", or None for all of them" if self.none else "")

    def problem(self, key: str, value: Any, blocks: int | None = None, shown: Any = None) -> str | None:
        if blocks is None or (value is None and self.none) or (_whole(value) and 0 <= value <= blocks):
            return None
        echoed = repr(value) if shown is None else shown
        return f"The value of `{key}` is {echoed}, but the model has {blocks} blocks: use 0..{blocks}"


# --------------------------------------------------------------------------- declaring


def setting(default: T, doc: str, rule: Rule | None = None) -> T:
    """A dataclass field with its default, its one-line description (unit included) and its
    rule; without a rule the field is documented but anything its type allows goes."""
    return dataclasses.field(default=default, metadata=about(doc, rule))


def about(doc: str, rule: Rule | None = None) -> dict[str, Any]:
    """The metadata :func:`setting` attaches, for ``field(metadata=...)`` of a field that has
    no default (a type checker sees a field without a default only in a plain ``field()``)."""
    return {"doc": doc, "rule": rule}


# --------------------------------------------------------------------------- using


def rule_of(cls: type, name: str) -> Rule:
    """The rule declared for the setting ``name`` of ``cls`` (for a flag that overrides it)."""
    rule = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("rule")
    if rule is None:
        raise KeyError(f"{cls.__name__}.{name} declares no rule")
    return rule


def problems(obj: Any, prefix: str = "", blocks: int | None = None) -> list[str]:
    """Every field of ``obj`` that breaks its rule, one message each, in field order;
    ``prefix`` is where ``obj`` sits in the study (``"data."``, ``"space."``)."""
    found = []
    for field in dataclasses.fields(obj):
        rule = field.metadata.get("rule")
        if rule is not None:
            message = rule.problem(prefix + field.name, getattr(obj, field.name), blocks)
            if message:
                found.append(message)
    return found


def markdown(sections: Iterable[tuple[str, str, type]]) -> str:
    """docs/settings.md: for each ``(title, intro, class)``, a table of the class's settings
    with their defaults, what is allowed and what each is."""
    lines = [
        "# Settings",
        "",
        "Generated from the declarations in `sweeper/` (`sweeper.finetune.rules`): every rule here is",
        "the one the check enforces and the error message states. Rebuild it after changing a setting:",
        "",
        "    .venv/bin/python -c 'from sweeper import study; print(study.settings_markdown(), end=\"\")' \\",
        "        > docs/settings.md",
    ]
    for title, intro, cls in sections:
        rows = []
        for field in dataclasses.fields(cls):
            if "doc" not in field.metadata:
                continue
            rule = field.metadata["rule"]
            rows.append([f"`{field.name}`", _default(field), rule.text if rule is not None else "",
                         field.metadata["doc"]])
        lines += ["", f"## {title}", "", intro, "", *_table(["setting", "default", "allowed", "what it is"], rows)]
    return "\n".join(lines) + "\n"


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is dataclasses.MISSING:
        return "(required)"
    return f"`{field.default!r}`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; ``|`` and ``<`` inside a cell are escaped, so that a cell stays one
    cell and ``<split>`` is not read as an HTML tag."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("<", "&lt;") for cell in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]
