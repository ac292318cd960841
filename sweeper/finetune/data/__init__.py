"""Data: where a study's examples come from, and how they reach the model.

Three sources, each a small dataclass a study file names:

- :class:`TextData`: a folder of one file per split, all of one type (GLUE's TSV layout
  ``train.tsv``/``validation.tsv``, or ``.csv``, ``.jsonl``, ``.parquet``), a folder that
  ``datasets.save_to_disk`` wrote, or a Hugging Face hub data set (``"glue/sst2"``) when a
  network is there.
- :class:`ImageData`: an image folder (``train/<class>/*.png``, ``test/<class>/*.png``) or a
  torchvision data set by name (``"CIFAR10"``).
- :class:`SyntheticText`: a small generated sentiment task that needs nothing from outside:
  the quickstart study and the tests.

Honest selection: the sweep tunes on a *validation* split carved (seeded) out of the
training data; the data set's own held-out split becomes *test*, which is evaluated for the
best trial only.

Everything is prepared once per study and cached on disk as plain ``.npy`` arrays (never
pickled), keyed by a hash of the source, the tokenizer and the settings, so every later
trial and every worker on the machine starts from memory-mapped arrays. A file lock makes
the first worker tokenise while the others wait for its result.

The package's modules, one job each: ``_specs`` (the three specs), ``_splits`` (the prepared
splits, the validation carve-out, batching), ``_cache`` (the on-disk cache), ``_readers``
(file, saved, hub and image sources) and ``_synthetic`` (the generated task).
"""

from __future__ import annotations

from sweeper.finetune.data._cache import CACHE_FORMAT, prepare
from sweeper.finetune.data._specs import (
    VALIDATION_SPLITS,
    BaseDataSpec,
    DataSpec,
    ImageData,
    SyntheticText,
    TextData,
)
from sweeper.finetune.data._splits import (
    ImageSplit,
    PreparedData,
    Split,
    TextSplit,
    carve,
    evaluation_batches,
    training_batches,
)
from sweeper.finetune.data._synthetic import synthetic_sentiment, synthetic_vocabulary

# bench/validation_split.py and bench/recipe_probe.py carve as a study does, by this name.
_carve = carve

__all__ = [
    "CACHE_FORMAT",
    "VALIDATION_SPLITS",
    "BaseDataSpec",
    "DataSpec",
    "ImageData",
    "ImageSplit",
    "PreparedData",
    "Split",
    "SyntheticText",
    "TextData",
    "TextSplit",
    "carve",
    "check_source",
    "evaluation_batches",
    "prepare",
    "synthetic_sentiment",
    "synthetic_vocabulary",
    "training_batches",
]


def check_source(spec: DataSpec) -> None:
    """Fail now, with one line, if the data cannot be found: before any worker starts, and
    without reading every example (``sweeper validate`` and ``launch`` call it)."""
    spec.check_source()
