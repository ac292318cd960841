"""Passwords are masked in every form a storage URL can carry one."""

from __future__ import annotations

import pytest

from sweeper.redact import mask


@pytest.mark.parametrize("text, shown", [
    ("postgresql://u:p@ss@db:5432/x", "postgresql://u:***@db:5432/x"),  # a raw "@" in the password
    ("postgresql://u:p@ss@db", "postgresql://u:***@db"),
    ("postgresql://:secret@db/x", "postgresql://:***@db/x"),
    ("postgresql://u@db/x?password=secret", "postgresql://u@db/x?password=***"),
    ("postgresql://db/x?sslmode=require&password=secret&user=u", "postgresql://db/x?sslmode=require&password=***&user=u"),
    ("connect failed: host=db password=secret dbname=x", "connect failed: host=db password=*** dbname=x"),
    ("'postgresql://u:secret@db/x' refused", "'postgresql://u:***@db/x' refused"),
    ("a@b and c:d e@f", "a@b and c:d e@f"),  # no URL, nothing to mask
])
def test_the_password_is_masked_whatever_form_it_takes(text: str, shown: str) -> None:
    assert mask(text) == shown
    assert "secret" not in mask(text) and "ss@" not in mask(text)
