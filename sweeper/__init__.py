"""sweeper: hyperparameter sweeps for fine-tuning pretrained models, built on Optuna.

A study file imports what it needs from here::

    from sweeper import Sweep, LogFloat, Int, TextClassifier, TextData

The names are resolved lazily, so that ``sweeper --help`` does not wait for PyTorch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Sweep": "sweeper.study",
    "Float": "sweeper.space",
    "LogFloat": "sweeper.space",
    "Int": "sweeper.space",
    "Categorical": "sweeper.space",
    "TextClassifier": "sweeper.finetune.model_specs",
    "TinyTextClassifier": "sweeper.finetune.model_specs",
    "ImageClassifier": "sweeper.finetune.model_specs",
    "TextData": "sweeper.finetune.data",
    "SyntheticText": "sweeper.finetune.data",
    "ImageData": "sweeper.finetune.data",
    "SweepError": "sweeper.errors",
    "TrialContext": "sweeper.user_train",
    "SweeperCallback": "sweeper.hf_callback",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sweeper' has no attribute {name!r}")
