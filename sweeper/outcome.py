"""What a worker and the trial it runs tell each other: who runs it, and how it ended.

Its own module so that ``objective`` (a trial) and ``worker`` (the process that runs trials)
both use it without importing each other.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from optuna.trial import TrialState


@dataclass
class WorkerInfo:
    index: int
    host: str = field(default_factory=socket.gethostname)
    device: str = "cpu"  # "cuda:0" style, as the worker sees it
    physical_gpu: str | None = None  # the GPU's index on its host (CUDA_VISIBLE_DEVICES)


@dataclass
class Outcome:
    """How a trial ended, as the worker tells Optuna."""

    state: TrialState
    value: float | None = None
    reason: str | None = None  # for FAIL, one line
    preempted: bool = False  # stopped on request: hand it back for a retry
    told: bool = False  # Optuna has heard already (a member of an array is told as it leaves)
