"""The frozen-prefix cache: compute the frozen bottom of a model once per example, reuse it.

With ``unfreeze_depth = d`` below the block count ``n``, the stem and the blocks below
``n - d`` are frozen *and* run in evaluation mode (``freeze.py``): they are a pure function
of the example. Their output, the *prefix*, is therefore the same in every epoch and in every
evaluation, and the same for every trial that freezes the same blocks of the same pretrained
weights. The loop asks this module for it before running the frozen bottom:

- the first time an example is seen, its batch runs the frozen bottom as the plain path does
  (so the first epoch is exactly the plain computation) and the output of each new example
  is stored;
- once every example of a batch is stored, the batch is gathered from the store instead.

Filling as examples come, rather than in a separate pass first, means a trial that is pruned
after half an epoch never pays for the examples it never saw.

Layout. Text prefixes have one row per real token: a flat ``[total_tokens, hidden]`` tensor
with the split's own offsets (``TextSplit.offsets``), padded per batch on the way out, with
zeros at padded positions (which the attention mask hides from every real token: their value
never reaches a real position). Fixed-shape features (image feature maps, the ``distill``
teacher's pooled features) have one row per example.

Keys. A store is found by what its values depend on, nothing less: a digest of the frozen
modules' weights and buffers (so a different model, or a different start block, can never be
served stale values), the split object itself (the objective keeps one per worker process,
so every trial of the worker shares it), the storage dtype and the device. A small LRU with a
byte budget keeps stores across the trials of one worker process.

Dtype. The plain path computes the prefix in fp32 on a CPU and under bf16 autocast on a GPU
(LayerNorm outputs fp32 there). ``"auto"`` stores fp32 where training runs in fp32 (results
equal the plain path's to float rounding, about 1e-6 relative) and bf16 where it runs under
bf16 autocast: half the memory, fp32's range (no overflow is possible), and a rounding of
2^-9 relative, the same rounding autocast applies to the input of the next block's first
matmul anyway; only the residual branch of the first trainable block sees it.

What cannot be cached: ``unfreeze_depth = n`` (nothing is frozen: the loop bypasses the
prefix cache), augmented training images (the input changes every epoch), and the masked
pass of ``pretrain_loss="mlm"`` (its input is masked anew at every step: it always runs the
frozen bottom itself; the unmasked task pass still uses the cache).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def storage_dtype(setting: str, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype cached features are kept in: ``setting`` or, for ``"auto"``, see above."""
    if setting == "auto":
        return torch.bfloat16 if autocast_dtype == torch.bfloat16 else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"`prefix_cache_dtype` is {setting!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[setting]


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """A digest of the modules' floating-point weights and buffers, in order.

    Per tensor: its shape, its sum and about a thousand of its values. Computed on the
    tensors' device with one transfer at the end: a few milliseconds for BERT-base.
    """
    parts: list[torch.Tensor] = []
    shapes: list[str] = []
    for module in modules:
        for name, tensor in module.state_dict(keep_vars=False).items():
            t = tensor.detach()
            shapes.append(f"{name}:{tuple(t.shape)}")
            flat = t.reshape(-1).float()
            if flat.numel() == 0:
                continue
            stride = max(1, flat.numel() // 1024)
            parts.append(flat.sum().reshape(1))
            parts.append(flat[::stride])
    digest = hashlib.sha256(";".join(shapes).encode())
    if parts:
        digest.update(torch.cat([p.to(parts[0].device) for p in parts]).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureStore:
    """Per-example features of one split, filled as examples are first computed.

    ``tokens=True``: one row per real token of each example (``offsets`` as the split's);
    otherwise one fixed-shape row per example.
    """

    def __init__(self, split: Any, tokens: bool, dtype: torch.dtype, device: torch.device,
                 budget: _Budget | None = None) -> None:
        self.split = split  # held, so that the split (and its id in the key) stays alive
        self.tokens = tokens
        self.dtype = dtype
        self.device = device
        self.budget = budget
        self.filled = np.zeros(len(split), dtype=bool)
        self.values: torch.Tensor | None = None  # allocated at the first store
        self.out_dtype: torch.dtype | None = None  # the dtype the plain path produced
        self.disabled = False  # too large for the budget: every batch runs the plain path
        self.hits = 0  # batches served from the store (for tests and benchmarks)
        self.stores = 0  # batches whose new examples were stored
        if tokens:
            self.offsets = np.asarray(split.offsets, dtype=np.int64)
            self.lengths = np.diff(self.offsets)

    # ------------------------------------------------------------------ queries

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.numel() * self.values.element_size()

    def has(self, indices: np.ndarray) -> bool:
        """True when every example of ``indices`` is stored (the batch can skip the bottom)."""
        return not self.disabled and self.values is not None and bool(self.filled[indices].all())

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """The stored features of ``indices`` as one batch, in the dtype they were computed in."""
        assert self.values is not None and self.out_dtype is not None
        self.hits += 1
        if not self.tokens:
            rows = _to_device(torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)), self.device)
            return self.values.index_select(0, rows).to(self.out_dtype)
        positions, valid = self._positions(indices)
        width = positions.shape[1]
        index = _to_device(torch.from_numpy(np.where(valid, positions, 0).reshape(-1)), self.device)
        out = self.values.index_select(0, index).view(len(indices), width, -1)
        padding = _to_device(torch.from_numpy(~valid), self.device)
        return out.to(self.out_dtype).masked_fill_(padding.unsqueeze(-1), 0)

    # ------------------------------------------------------------------ filling

    def store(self, indices: np.ndarray, features: torch.Tensor) -> None:
        """Keep the features of the examples of ``indices`` not stored yet (a batch, padded
        as the split pads it for text)."""
        if self.disabled:
            return
        new = ~self.filled[indices]
        if not new.any():
            return
        if self.values is None and not self._allocate(features):
            return
        assert self.values is not None
        rows = np.flatnonzero(new)
        values = features.detach()
        if not self.tokens:
            dst = _to_device(torch.from_numpy(indices[rows].astype(np.int64)), self.device)
            src = _to_device(torch.from_numpy(rows.astype(np.int64)), values.device)
            self.values.index_copy_(0, dst, values.index_select(0, src).to(self.dtype))
        else:
            positions, valid = self._positions(indices[rows])
            width = features.shape[1]
            # Source rows: token t of batch row r is row r * width + t of the flattened batch.
            src = (rows[:, None] * width + np.arange(positions.shape[1])[None, :])[valid]
            dst = positions[valid]
            flat = values.reshape(-1, values.shape[-1])
            self.values.index_copy_(
                0, _to_device(torch.from_numpy(dst), self.device),
                flat.index_select(0, _to_device(torch.from_numpy(src), flat.device)).to(self.dtype),
            )
        self.filled[indices[rows]] = True
        self.stores += 1

    def _allocate(self, features: torch.Tensor) -> bool:
        shape: tuple[int, ...]
        if self.tokens:
            shape = (int(self.offsets[-1]), int(features.shape[-1]))
        else:
            shape = (len(self.split), *features.shape[1:])
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=self.dtype).element_size()
        if self.budget is not None and not self.budget.reserve(self, nbytes):
            self.disabled = True
            logger.info("frozen-prefix cache of %.2f GiB exceeds its budget: running the frozen "
                        "blocks every time (raise LoopSettings.prefix_cache_gib)", nbytes / 2**30)
            return False
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.out_dtype = features.dtype
        return True

    def _positions(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each (example, token) in the flat store, and which of them are real."""
        lengths = self.lengths[indices]
        width = int(lengths.max()) if len(lengths) else 0
        steps = np.arange(width, dtype=np.int64)[None, :]
        return self.offsets[indices][:, None] + steps, steps < lengths[:, None]


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class _Budget:
    """The LRU of one process: stores of the most recent keys, within a byte budget."""

    def __init__(self) -> None:
        self.stores: OrderedDict[tuple[Any, ...], FeatureStore] = OrderedDict()
        self.limit = 0
        self.in_use: set[int] = set()  # ids of stores the running trial holds: never evicted

    def get(self, key: tuple[Any, ...], make: Any) -> FeatureStore:
        store = self.stores.get(key)
        if store is None:
            store = make()
            self.stores[key] = store
        self.stores.move_to_end(key)
        self.in_use.add(id(store))
        return store

    def reserve(self, store: FeatureStore, nbytes: int) -> bool:
        if nbytes > self.limit:
            return False
        for key in list(self.stores):
            if sum(s.nbytes for s in self.stores.values()) + nbytes <= self.limit:
                break
            if id(self.stores[key]) not in self.in_use:
                del self.stores[key]  # least recently used first
        return sum(s.nbytes for s in self.stores.values()) + nbytes <= self.limit

    def release(self) -> None:
        self.in_use.clear()

    def clear(self) -> None:
        self.stores.clear()
        self.in_use.clear()


_STORES = _Budget()


def open_store(
    kind: str, digest: str, split: Any, *, tokens: bool, dtype: torch.dtype, device: torch.device,
    budget_gib: float,
) -> FeatureStore:
    """The process's store for ``kind`` ("prefix" or "teacher") of ``split`` under weights
    ``digest``: the same object for every trial with the same key, until evicted."""
    _STORES.limit = int(budget_gib * 2**30)
    key = (kind, digest, id(split), len(split), str(dtype), str(device))
    return _STORES.get(key, lambda: FeatureStore(split, tokens, dtype, device, _STORES))


def release() -> None:
    """The trial is over: its stores may now be evicted for another trial's."""
    _STORES.release()


def clear() -> None:
    """Forget every store of this process (tests; freeing device memory)."""
    _STORES.clear()


def cached_stores() -> list[FeatureStore]:
    return list(_STORES.stores.values())
