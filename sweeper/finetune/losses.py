"""The training objective ``L = L_task + λ · L_pretrain``.

``L_task`` is the cross-entropy of the task head, averaged over the batch, in nats (with
optional label smoothing).

``L_pretrain`` keeps the model close to its pretrained behaviour. Each choice is normalised
so that it is dimensionless or in nats, and does not grow with the size of the model: the
same λ range (about 1e-4 to 10) is sensible for a 6-block MiniLM and a 12-block BERT-base.

``l2sp`` (Li, Grandvalet and Davoine, "Explicit inductive bias for transfer learning with
convolutional networks", ICML 2018): the relative squared drift of the trainable pretrained
weights from their starting values,

    L_l2sp = Σ_i ‖w_i − w⁰_i‖² / Σ_i ‖w⁰_i‖²

over every trainable parameter that has a pretrained value (the new head is excluded, as it
has none). 0 at step 0; 0.01 means the weights moved by 10% of their norm. Adam moves every
weight by about the learning rate per step, so fine-tuning typically reaches 1e-3 to 1e-1.

``distill`` (Learning without Forgetting, Li and Hoiem, ECCV 2016, for an encoder with no old
task head): the cosine distance between the pooled features of the model and those of the
frozen pretrained model on the same batch,

    L_distill = mean_batch (1 − cos(f(x), f⁰(x)))

with ``f`` the mean of the last block's outputs over the real tokens (the global average pool
for a CNN). Between 0 and 2; 0 at step 0 in evaluation mode (with dropout on, the noise makes
it slightly positive). Only the trainable top differs between the two models, so the frozen
copy runs just those blocks, on the frozen bottom's output the model has already computed.

``mlm`` (for checkpoints that keep their masked-LM head, as BERT's do): the masked-LM loss of
the *pretrained* LM head (frozen) on the task's own text through the current encoder, with
BERT's recipe: 15% of the real tokens chosen, of which 80% become ``[MASK]``, 10% a random
token, 10% stay. In nats per masked token, like ``L_task``; at step 0 it equals the pretrained
model's own masked-LM loss, its floor in expectation. It needs a second pass of the encoder
on the masked text, so it costs about twice the compute of the others.

``none``: 0, and λ is ignored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sweeper.finetune import freeze
from sweeper.finetune.models import ModelAdapter


def task_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    # fp32 at least (bf16 logits under autocast are widened); fp64 stays fp64 (exactness tests).
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                           label_smoothing=label_smoothing)


@dataclass
class Pass:
    """What one forward pass of the model computed, for the pretraining terms to reuse."""

    batch: dict[str, torch.Tensor]
    prefix: torch.Tensor  # output of the frozen bottom (the stem's output at full depth)
    top: torch.Tensor  # output of the last block
    context: Any
    teacher: torch.Tensor | None = None  # the ``distill`` teacher's pooled features, if cached


class PretrainLoss:
    """``L_pretrain``: zero unless a subclass says otherwise."""

    name = "none"

    def __call__(self, adapter: ModelAdapter, forward: Pass) -> torch.Tensor:
        return torch.zeros((), device=forward.top.device)


class L2SP(PretrainLoss):
    name = "l2sp"

    def __init__(self, adapter: ModelAdapter, depth: int) -> None:
        self.params = list(freeze.pretrained_parameters(adapter, depth).values())
        self.start = [p.detach().clone() for p in self.params]
        self.norm = float(sum(w.double().pow(2).sum() for w in self.start)) or 1.0

    def __call__(self, adapter: ModelAdapter, forward: Pass) -> torch.Tensor:
        if not self.params:
            return torch.zeros((), device=forward.top.device)
        # fp32 at least (a bf16 parameter is widened); fp64 stays fp64 (the arrays' exactness tests).
        drift = sum((p.to(torch.promote_types(p.dtype, torch.float32)) - w).pow(2).sum()
                    for p, w in zip(self.params, self.start))
        return drift / self.norm  # type: ignore[return-value]


class Distill(PretrainLoss):
    name = "distill"

    def __init__(self, adapter: ModelAdapter, depth: int) -> None:
        start = freeze.first_trainable_block(depth, adapter.num_blocks)
        self.full_depth = start == 0
        # Frozen copies of the trainable part only: below it the two models are the same.
        self.teacher_stem = _frozen_copy(adapter.stem) if self.full_depth else None
        self.teacher_blocks = [_frozen_copy(b) for b in adapter.blocks[start:]]

    @torch.no_grad()
    def teacher_features(self, adapter: ModelAdapter, forward: Pass) -> torch.Tensor:
        if self.teacher_stem is not None:
            hidden, context = adapter.embed(forward.batch, stem=self.teacher_stem)
        else:
            hidden, context = forward.prefix, forward.context
        return adapter.pool(adapter.run(hidden, context, self.teacher_blocks), context)

    def __call__(self, adapter: ModelAdapter, forward: Pass) -> torch.Tensor:
        # The teacher is frozen and in evaluation mode: its features of an example never
        # change, so the loop may hand in stored ones (``prefix.py``).
        teacher = forward.teacher if forward.teacher is not None else self.teacher_features(adapter, forward)
        teacher = teacher.float()
        student = adapter.pool(forward.top, forward.context).float()
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


class MaskedLM(PretrainLoss):
    name = "mlm"

    def __init__(
        self, lm_head: nn.Module, tokenizer: Any, start: int, seed: int, rate: float = 0.15
    ) -> None:
        self.lm_head = lm_head
        self.start = start  # the lowest trainable block: below it runs without gradients
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.rate = rate
        self.generator = torch.Generator().manual_seed(seed)

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's 80/10/10 masking of ``rate`` of the real tokens; labels are -100 elsewhere."""
        g = self.generator
        ids = input_ids.cpu()
        real = attention_mask.cpu().bool() & ~torch.isin(ids, self.special_ids)
        chosen = (torch.rand(ids.shape, generator=g) < self.rate) & real
        if not chosen.any():  # a very short batch: mask one real token so the loss exists
            flat = real.flatten().nonzero()
            if len(flat):
                chosen.view(-1)[flat[torch.randint(len(flat), (1,), generator=g)]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=g)
        masked = ids.clone()
        masked[chosen & (roll < 0.8)] = self.mask_id
        random_tokens = torch.randint(self.vocab_size, ids.shape, generator=g)
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        masked[swap] = random_tokens[swap]
        return masked.to(input_ids.device), labels.to(input_ids.device)

    def __call__(self, adapter: ModelAdapter, forward: Pass) -> torch.Tensor:
        batch = forward.batch
        masked, labels = self.mask(batch["input_ids"], batch["attention_mask"])
        top = encode(adapter, {**batch, "input_ids": masked}, self.start)
        scores = self.lm_head.to(top.device)(top)
        return F.cross_entropy(scores.float().view(-1, scores.shape[-1]), labels.view(-1), ignore_index=-100)


def encode(adapter: ModelAdapter, batch: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    """The last block's output, with the frozen bottom (blocks below ``start``) under no_grad."""
    if start == 0:
        hidden, context = adapter.embed(batch)
    else:
        with torch.no_grad():
            hidden, context = adapter.embed(batch)
            hidden = adapter.run(hidden, context, adapter.blocks[:start])
    return adapter.run(hidden, context, adapter.blocks[start:])


def _frozen_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def build(
    name: str, adapter: ModelAdapter, depth: int, *, lm_head: nn.Module | None = None,
    tokenizer: Any = None, seed: int = 0,
) -> PretrainLoss:
    """The ``L_pretrain`` term ``name`` for ``adapter`` frozen at ``depth``."""
    if name == "l2sp":
        return L2SP(adapter, depth)
    if name == "distill":
        return Distill(adapter, depth)
    if name == "mlm":
        assert lm_head is not None and tokenizer is not None, "mlm needs the LM head and tokenizer"
        start = freeze.first_trainable_block(depth, adapter.num_blocks)
        return MaskedLM(lm_head, tokenizer, start, seed)
    return PretrainLoss()
