"""The prepared splits, the seeded validation carve-out, and the batches a trial draws.

PyTorch is imported where a batch is made, not with the module: a study file's data spec
imports this, and checking a study needs no PyTorch (``model_specs.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


class Split(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]: ...

    def lengths(self) -> np.ndarray: ...


@dataclass
class TextSplit:
    """Tokenised examples stored flat: example i is ``input_ids[offsets[i]:offsets[i+1]]``."""

    input_ids: np.ndarray  # int32, all examples concatenated
    offsets: np.ndarray  # int64, len(self) + 1
    labels: np.ndarray  # int64
    pad_id: int
    token_type_ids: np.ndarray | None = None  # int8, same layout as input_ids; None = all zero

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Pad the chosen examples to the longest of them (dynamic padding)."""
        import torch

        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        width = int((ends - starts).max())
        ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        types = np.zeros((len(indices), width), dtype=np.int64)
        for row, (start, end) in enumerate(zip(starts, ends)):
            ids[row, : end - start] = self.input_ids[start:end]
            mask[row, : end - start] = 1
            if self.token_type_ids is not None:
                types[row, : end - start] = self.token_type_ids[start:end]
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.from_numpy(types),
            "labels": torch.from_numpy(self.labels[indices].astype(np.int64)),
        }
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def subset(self, indices: np.ndarray) -> TextSplit:
        lengths = self.lengths()[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = [self.input_ids[self.offsets[i] : self.offsets[i + 1]] for i in indices]
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        types = None
        if self.token_type_ids is not None:
            tpieces = [self.token_type_ids[self.offsets[i] : self.offsets[i + 1]] for i in indices]
            types = np.concatenate(tpieces) if tpieces else np.zeros(0, dtype=np.int8)
        return TextSplit(ids, offsets, self.labels[indices], self.pad_id, types)


@functools.cache
def _image_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's channel mean and standard deviation on ``device``: every torchvision ResNet
    was pretrained on inputs normalised this way."""
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    return mean, torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)


@dataclass
class ImageSplit:
    images: np.ndarray  # uint8, N x H x W x 3
    labels: np.ndarray  # int64
    augment: bool = False  # random crop (padding 4) and horizontal flip, per batch

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.ones(len(self.labels), dtype=np.int64)

    def batch(self, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(self.images[indices])).to(device)
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment:
            pixels = _augment(pixels)
        mean, std = _image_statistics(torch.device(device))
        pixels = (pixels - mean) / std
        labels = torch.from_numpy(self.labels[indices].astype(np.int64)).to(device)
        return {"pixel_values": pixels, "labels": labels}

    def subset(self, indices: np.ndarray) -> ImageSplit:
        return ImageSplit(self.images[indices], self.labels[indices], self.augment)


def _augment(pixels: torch.Tensor) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip (the standard CIFAR recipe)."""
    import torch

    n, _, h, w = pixels.shape
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,)).tolist()
    dx = torch.randint(0, 9, (n,)).tolist()
    crops = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    flip = torch.rand(n, device=pixels.device) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


@dataclass
class PreparedData:
    """The three splits of a study, ready for batching."""

    train: Any  # TextSplit | ImageSplit
    validation: Any
    test: Any
    num_labels: int
    label_names: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def carve(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) index arrays: validation is ``fraction`` of ``n``."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


def training_batches(
    lengths: np.ndarray, batch_size: int, seed: int, bucket_factor: int = 50
) -> list[np.ndarray]:
    """Shuffled batches of examples of similar length, different for every ``seed``.

    Examples are shuffled, cut into pools of ``batch_size * bucket_factor``, each pool sorted
    by length and cut into batches, and the batches shuffled: padding shrinks to a few tokens
    while every epoch still sees a different order (the "bucket iterator" of AllenNLP/fairseq).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    pool = batch_size * bucket_factor
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type, unused-ignore]
    return batches


def evaluation_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """All examples once, sorted by length so that padding is minimal."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
