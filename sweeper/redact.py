"""Passwords out of everything sweeper prints, logs or raises."""

from __future__ import annotations

import re

_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@]*):(?P<password>[^@]*)@", re.I)


def mask(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
