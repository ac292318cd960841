"""The errors a user can act on.

Library code raises these with a message that names the setting, echoes its value, states
the rule and says what to do next; the CLI prints the message as one line and exits with
code 2. Anything else that escapes is a bug in sweeper and keeps its traceback.
"""

from __future__ import annotations

import os


class SweepError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(SweepError):
    """Every problem found in a study and its ``--set`` overrides, reported together."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: {count}: " + "; ".join(problems))


class ModelNotLoaded(SweepError):
    """A pretrained model that could not be loaded from where ``model`` points."""

    def __init__(self, path: str, exc: Exception) -> None:
        where = "folder" if os.path.isdir(path) else "hub name"
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        super().__init__(f"could not load the model {path!r} ({where}: {reason}): without a network, point "
                         "`model` at a local folder, e.g. --set model=../shared/models/minilm-l6-h384")
