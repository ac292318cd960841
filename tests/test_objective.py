from __future__ import annotations

import optuna
import torch

from sweeper.errors import SweepError
from sweeper.objective import _one_line, trial_seed


def _trial_with_batch(size: int) -> optuna.Trial:
    trial = optuna.create_study().ask()
    trial.suggest_categorical("batch_size", [size])
    return trial


def test_out_of_memory_names_the_batch_size_and_the_remedy() -> None:
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert _one_line(oom, _trial_with_batch(64)) == (
        "CUDA out of memory at batch_size 64: lower batch_size or --workers-per-gpu")


def test_a_failed_host_allocation_is_out_of_memory_too() -> None:
    try:
        torch.empty(2**50)  # 4 PiB: PyTorch's CPU allocator refuses it for real
    except RuntimeError as exc:
        assert _one_line(exc, _trial_with_batch(8)) == (
            "out of host memory: lower batch_size or the number of workers")
    else:
        raise AssertionError("a 4 PiB allocation succeeded")


def test_a_user_error_keeps_its_own_line_and_a_bug_gets_its_type() -> None:
    trial = _trial_with_batch(8)
    assert _one_line(SweepError("`batch_size` is 0: use 1..4096"), trial) == "`batch_size` is 0: use 1..4096"
    assert _one_line(ValueError("bad\nthing"), trial) == "ValueError: bad thing"


def test_a_retry_keeps_the_seed_of_the_trial_it_replaces() -> None:
    assert trial_seed(0, 5) == trial_seed(0, 5)
    assert trial_seed(0, 5) != trial_seed(0, 6) != trial_seed(1, 5)
