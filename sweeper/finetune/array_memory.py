"""How many members of a trial array fit on the device: an estimate of a member's bytes
against what the device has to spare; a too-large array is made smaller with one log line,
never left to run out of memory (issue 21)."""

from __future__ import annotations

import logging
import os

import torch

from sweeper.finetune import freeze
from sweeper.finetune.models import ModelAdapter

logger = logging.getLogger(__name__)


def member_bytes(adapter: ModelAdapter, depth: int, batch_size: int, max_length: int) -> int:
    """What one member adds to the device: its trainable weights six times (weights,
    gradient, AdamW's two moments, the l2sp start and the gathered gradient), and its
    activations as the backward pass keeps them. A BERT block: about 40 floats per token and
    width, and an S×S attention matrix per head (``max_length`` is S). A ResNet block: about
    12 feature maps of 128 channels at a quarter of the image side (``max_length`` is the
    image side), an over-estimate for every torchvision ResNet but the stem."""
    trainable = sum(p.numel() for p in freeze.apply(adapter, depth))
    if adapter.kind == "image":
        activations = (depth + 1) * 12 * batch_size * 128 * (max_length // 4) ** 2
        return 4 * (6 * trainable + activations)
    config = adapter.model.config
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    tokens = batch_size * max_length
    activations = depth * (40 * tokens * width + 3 * batch_size * heads * max_length * max_length)
    return 4 * (6 * trainable + activations)


def device_budget(device: torch.device) -> int:
    """Bytes the array may take: 80% of what the GPU has free, or half the host's
    available memory on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 4


def fit_array_size(requested: int, adapter: ModelAdapter, depth: int, batch_size: int, max_length: int,
                   device: torch.device, budget: int | None = None) -> int:
    """``requested`` members, or as many as the device holds (at least 1), with one log line
    when it is fewer: a too-large array is made smaller, never left to run out of memory."""
    each = member_bytes(adapter, depth, batch_size, max_length)
    budget = device_budget(device) if budget is None else budget
    fits = max(1, min(requested, budget // max(1, each)))
    if fits < requested:
        logger.warning("array_size %d needs about %.2f GiB (%.3f GiB a member) and the device has %.2f GiB "
                       "to spare: training %d members at a time", requested, requested * each / 2**30,
                       each / 2**30, budget / 2**30, fits)
    return fits
