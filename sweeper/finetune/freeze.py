"""Unfreeze depth: which part of a pretrained model trains.

``unfreeze_depth = d`` on a model of ``n`` blocks trains the new head and the top ``d``
blocks; everything below stays at its pretrained values, takes no gradient and is not in
the optimizer. ``d = 0`` is a linear probe (only the head trains); ``d = n`` is full
fine-tuning, and only then does the stem (token embeddings, or the convolutional stem) train
as well.

Frozen blocks also run in evaluation mode: dropout off and BatchNorm statistics fixed. That
is a choice, not an accident: it makes a frozen block a pure function of its input, so its
outputs can be computed once and reused (see ``loop.py``), and it keeps frozen BatchNorm
layers from drifting on the new data without any gradient to correct them. Plain
``requires_grad=False`` freezing, as most recipes do it, leaves dropout active in frozen
blocks; with depth below ``n`` sweeper's frozen bottom therefore sees no dropout noise.

What the frozen-prefix cache (``prefix.py``, issue 7) changes on top of that: nothing in what
is computed. Because the frozen bottom is already deterministic, its output for an example is
computed once, in the first batch that holds the example, and read back in later epochs,
evaluations and trials; only float rounding differs (fp32 storage on a CPU; bf16 storage
under bf16 autocast on a GPU, see ``prefix.py``). Exactly what differs from a recipe that
freezes with ``requires_grad=False`` alone:

- dropout (hidden and attention) is off in the stem and the frozen blocks, in training as in
  evaluation; the trainable blocks and the head keep their dropout;
- BatchNorm layers of frozen blocks use their pretrained running statistics and do not
  update them;
- at ``d = n`` nothing is frozen: the stem and every block train with dropout on, and no
  prefix is cached.
"""

from __future__ import annotations

import torch
from torch import nn

from sweeper.errors import SweepError
from sweeper.finetune import rules
from sweeper.finetune.models import ModelAdapter


def check_depth(depth: int, num_blocks: int) -> None:
    """A resolved depth (None, all blocks, has become ``num_blocks`` by now) the model has."""
    problem = rules.Blocks(none=False).problem("unfreeze_depth", depth, num_blocks)
    if problem:
        raise SweepError(problem)


def first_trainable_block(depth: int, num_blocks: int) -> int:
    """Index of the lowest block that trains: blocks below it are the frozen prefix."""
    return num_blocks - depth


def apply(adapter: ModelAdapter, depth: int) -> list[nn.Parameter]:
    """Freeze ``adapter`` for ``depth`` and return its trainable parameters, bottom to top."""
    check_depth(depth, adapter.num_blocks)
    start = first_trainable_block(depth, adapter.num_blocks)
    for p in adapter.parameters():
        p.requires_grad_(False)
    trainable_modules: list[nn.Module] = []
    if depth == adapter.num_blocks:
        trainable_modules.append(adapter.stem)
    trainable_modules.extend(adapter.blocks[start:])
    trainable_modules.extend(adapter.head_modules)
    for module in trainable_modules:
        for p in module.parameters():
            p.requires_grad_(True)
    return [p for p in adapter.parameters() if p.requires_grad]


def trained_buffers(adapter: ModelAdapter, depth: int) -> dict[str, torch.Tensor]:
    """The buffers that training changes, by the model's own names: those of the trainable
    part (a ResNet's BatchNorm running statistics). A resume state and a best model carry
    them beside the trainable parameters, or a resumed trial and an exported checkpoint would
    evaluate with statistics of another step (or the pretrained ones)."""
    start = first_trainable_block(depth, adapter.num_blocks)
    modules: list[nn.Module] = [*adapter.blocks[start:], *adapter.head_modules]
    if depth == adapter.num_blocks:
        modules.append(adapter.stem)
    owned = {id(b) for module in modules for b in module.buffers()}
    return {name: b for name, b in adapter.model.named_buffers() if id(b) in owned}


def pretrained_parameters(adapter: ModelAdapter, depth: int) -> dict[str, nn.Parameter]:
    """The trainable parameters that have pretrained values (everything but the new head)."""
    head_ids = {id(p) for m in adapter.head_modules for p in m.parameters()}
    return {
        name: p for name, p in adapter.named_parameters()
        if p.requires_grad and id(p) not in head_ids
    }


def set_train_mode(adapter: ModelAdapter, depth: int) -> None:
    """Training mode for the trainable part, evaluation mode for the frozen bottom."""
    adapter.train()
    start = first_trainable_block(depth, adapter.num_blocks)
    if depth < adapter.num_blocks:
        adapter.stem.eval()
    for block in adapter.blocks[:start]:
        block.eval()
