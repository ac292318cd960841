"""Passwords out of everything sweeper prints, logs, raises or records."""

from __future__ import annotations

import re

# user:password@host: the password runs to the last "@" of the authority, so a password with a
# raw "@" in it (which libpq accepts) is masked whole, not up to its own "@".
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^/\s]*)@"
                       r"(?=[^@/\s]*(?:[/?#\s'\"]|$))", re.I)
# ?password=... or &password=... in a URL's query, and password=... in a libpq connection string.
_KEYWORD = re.compile(r"(?P<key>(?:[?&]|\b)(?:password|passwd|pwd)=)(?P<password>[^&\s'\"]*)", re.I)


def mask(text: str) -> str:
    """``text`` with the password of every URL and connection string in it replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _KEYWORD.sub(lambda m: f"{m['key']}***", text)
