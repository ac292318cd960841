"""The trainable top of a BERT-family encoder for K trials at once: every weight has a member
dimension in front, every input either has one too or is shared by all members.

Written by hand rather than through ``torch.func.vmap`` because of what it launches: a
linear layer is one ``baddbmm`` for all K members (its bias fused), a LayerNorm two kernels,
attention one ``scaled_dot_product_attention`` over the K·B rows, so a step launches about as
many operators for K members as for one (bench/README.md, "Trial arrays", has the counts
against vmap's). The math is the Hugging Face modules' own (``BertLayer``, ``BertEmbeddings``,
``BertPooler`` and the classifier), in the same order, so a member's loss equals the same
trial's alone to float rounding (tests/finetune/test_arrays.py).

Dropout draws each member's masks from its own generator, seeded per member step as the loop
seeds a trial's: a member's masks do not depend on who else is in the array, or on its slot.
They are not the masks Hugging Face's dropout draws alone (those come from the global
generator in the modules' own order), so with dropout on a member repeats itself in any
array, not the alone run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sweeper.errors import SweepError
from sweeper.finetune.models import ModelAdapter, TextAdapter


@dataclass
class Noise:
    """The dropout of one step: per member its rates and its generator; None = no dropout."""

    # Per member, as Python numbers: deciding whether to draw never waits for the device.
    hidden: Sequence[float]  # hidden-state dropout rate of each member
    attention: Sequence[float]  # attention-probability dropout rate
    classifier: Sequence[float]  # dropout before the classifier
    generators: Sequence[torch.Generator]
    training: bool = True

    def drop(self, x: torch.Tensor, rates: Sequence[float]) -> torch.Tensor:
        """Inverted dropout of ``x`` ([K, ...]) at each member's rate, its mask from its own
        generator (one draw per member: the price of masks that are the member's alone)."""
        if not self.training or not any(p > 0 for p in rates):
            return x
        masks = []
        for p, generator in zip(rates, self.generators):
            if p <= 0:
                masks.append(torch.ones(x.shape[1:], dtype=x.dtype, device=x.device))
            else:
                keep = torch.rand(x.shape[1:], generator=generator, device=x.device) >= p
                masks.append(keep.to(x.dtype) / (1.0 - p))
        return x * torch.stack(masks)


@dataclass
class TextPlan:
    """Where the stacked weights of a text model's trainable top are, by the model's names."""

    start: int  # the lowest trainable block; 0 = the stem trains too
    layers: list[dict[str, str]]  # per trainable block: role -> parameter name
    stem: dict[str, str] | None  # the embeddings' parameter names at full depth
    head: dict[str, str]  # pooler (optional) and classifier
    heads: int  # attention heads
    eps: float  # LayerNorm epsilon
    activation: Any  # the intermediate activation, the model's own function
    pad_token_id: int | None


_LAYER_ROLES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm",
}


def text_plan(adapter: ModelAdapter, start: int) -> TextPlan:
    """The plan of ``adapter``'s top from block ``start``, or a SweepError saying why this
    model cannot be stacked (the array then cannot take it: train its trials alone)."""
    if not isinstance(adapter, TextAdapter):
        raise SweepError(f"trial arrays stack text encoders; this model is a {adapter.kind} model")
    model, config = adapter.model, adapter.config
    names = {id(p): n for n, p in model.named_parameters()}
    classifier = getattr(model, "classifier", None)
    if not adapter._pooled_head or not isinstance(classifier, torch.nn.Linear) \
            or getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise SweepError(
            f"trial arrays stack BERT-style models (pooled [CLS] head, absolute positions); "
            f"{type(model).__name__} is not one: run it with array_size=1"
        )

    def roles(module: torch.nn.Module, table: dict[str, str]) -> dict[str, str]:
        found = {}
        for role, path in table.items():
            part = module.get_submodule(path)
            found[role + ".weight"] = names[id(part.weight)]
            if getattr(part, "bias", None) is not None:
                found[role + ".bias"] = names[id(part.bias)]
        return found

    try:
        layers = [roles(block, _LAYER_ROLES) for block in adapter.blocks[start:]]
    except AttributeError as exc:
        raise SweepError(f"trial arrays stack BERT-style layers; {type(model).__name__}'s differ ({exc})") from None
    stem = None
    if start == 0:
        stem = roles(adapter.stem, {"word": "word_embeddings", "position": "position_embeddings",
                                    "type": "token_type_embeddings", "norm": "LayerNorm"})
    pooler = {"pooler": "dense"} if adapter._pooler is not None else {}
    head = roles(adapter._pooler, pooler) if adapter._pooler is not None else {}
    head.update(roles(model, {"classifier": "classifier"}))
    from transformers.activations import ACT2FN

    return TextPlan(start, layers, stem, head, int(config.num_attention_heads), float(config.layer_norm_eps),
                    ACT2FN[config.hidden_act], getattr(config, "pad_token_id", None))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` per member ([K, ..., in] by [K, out, in]): one batched matmul
    with the bias fused, for all members."""
    members, out = weight.shape[0], weight.shape[1]
    rows = x.reshape(members, -1, x.shape[-1])
    if bias is None:
        result = torch.bmm(rows, weight.transpose(1, 2))
    else:
        result = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
    return result.view(members, *x.shape[1:-1], out)


def shared_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear` of an input every member shares ([..., in]): the rows are not copied."""
    members, out = weight.shape[0], weight.shape[1]
    rows = x.reshape(1, -1, x.shape[-1]).expand(members, -1, -1)
    if bias is None:
        result = torch.bmm(rows, weight.transpose(1, 2))
    else:
        result = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
    return result.view(members, *x.shape[:-1], out)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension with each member's own gain and shift ([K, H])."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[1],)
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return torch.addcmul(bias.view(shape), normed, weight.view(shape))


def embeddings(plan: TextPlan, p: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
               noise: Noise) -> torch.Tensor:
    """``BertEmbeddings`` per member: word + token type + position, LayerNorm, dropout."""
    assert plan.stem is not None
    s = plan.stem
    ids = batch["input_ids"]
    b, length = ids.shape
    word = p[s["word.weight"]]
    members = word.shape[0]
    types = batch.get("token_type_ids")
    if types is None:
        types = torch.zeros_like(ids)
    hidden = word.index_select(1, ids.reshape(-1)).view(members, b, length, -1)
    hidden = hidden + p[s["type.weight"]].index_select(1, types.reshape(-1)).view(members, b, length, -1)
    hidden = hidden + p[s["position.weight"]][:, :length].unsqueeze(1)
    hidden = layer_norm(hidden, p[s["norm.weight"]], p[s["norm.bias"]], plan.eps)
    return noise.drop(hidden, noise.hidden)


def block(plan: TextPlan, names: dict[str, str], p: dict[str, torch.Tensor], hidden: torch.Tensor,
          shared: bool, mask: torch.Tensor | None, noise: Noise) -> torch.Tensor:
    """One ``BertLayer`` per member. ``hidden`` is [K, B, S, H], or [B, S, H] shared by all
    members (the frozen bottom's output, into the lowest trainable block)."""
    def w(role: str) -> torch.Tensor:
        return p[names[role + ".weight"]]

    def bias(role: str) -> torch.Tensor | None:
        key = names.get(role + ".bias")
        return p[key] if key is not None else None

    project = shared_linear if shared else linear
    members = w("query").shape[0]
    b, length, width = hidden.shape[-3:]
    heads = plan.heads

    def split(x: torch.Tensor) -> torch.Tensor:  # [K, B, S, H] -> [K·B, heads, S, H/heads]
        return x.view(members * b, length, heads, width // heads).transpose(1, 2)

    q, k, v = (split(project(hidden, w(r), bias(r))) for r in ("query", "key", "value"))
    rows_mask = None
    if mask is not None:  # [B, 1, S, S] -> the same for every member's rows
        rows_mask = mask.unsqueeze(0).expand(members, *mask.shape).reshape(members * b, *mask.shape[1:])
    scale = (width // heads) ** -0.5
    if noise.training and any(p > 0 for p in noise.attention):
        attended = _attention_with_dropout(q, k, v, rows_mask, scale, noise, members)
    else:
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=rows_mask, scale=scale)
    attended = attended.transpose(1, 2).reshape(members, b, length, width)
    residual = hidden if not shared else hidden.unsqueeze(0)
    x = noise.drop(linear(attended, w("attn_out"), bias("attn_out")), noise.hidden)
    x = layer_norm(x + residual, w("attn_norm"), bias("attn_norm"), plan.eps)  # type: ignore[arg-type]
    inner = plan.activation(linear(x, w("inter"), bias("inter")))
    y = noise.drop(linear(inner, w("out"), bias("out")), noise.hidden)
    return layer_norm(y + x, w("out_norm"), bias("out_norm"), plan.eps)  # type: ignore[arg-type]


def _attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float, noise: Noise, members: int) -> torch.Tensor:
    """Eager attention (transformers' ``eager_attention_forward``) with per-member dropout of
    the probabilities: SDPA's own dropout draws one mask stream for all rows."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    probs = F.softmax(scores, dim=-1)
    probs = noise.drop(probs.view(members, -1, *probs.shape[1:]), noise.attention).view_as(probs)
    return torch.matmul(probs, v)


def head(plan: TextPlan, p: dict[str, torch.Tensor], top: torch.Tensor, noise: Noise) -> torch.Tensor:
    """Pooler (tanh of a dense layer on [CLS]), dropout, classifier: logits [K, B, labels]."""
    h = plan.head
    pooled = top[:, :, 0]
    if "pooler.weight" in h:
        pooled = torch.tanh(linear(pooled.unsqueeze(2), p[h["pooler.weight"]], p[h["pooler.bias"]]).squeeze(2))
    pooled = noise.drop(pooled, noise.classifier)
    return linear(pooled.unsqueeze(2), p[h["classifier.weight"]], p[h["classifier.bias"]]).squeeze(2)


def forward(plan: TextPlan, p: dict[str, torch.Tensor], hidden: torch.Tensor | None,
            batch: dict[str, torch.Tensor], mask: torch.Tensor | None, noise: Noise) -> torch.Tensor:
    """Logits [K, B, labels] of the trainable top: from the shared frozen output ``hidden``,
    or from the members' own embeddings at full depth (``hidden`` None)."""
    shared = hidden is not None
    x = hidden if hidden is not None else embeddings(plan, p, batch, noise)
    for names in plan.layers:
        x = block(plan, names, p, x, shared, mask, noise)
        shared = False
    if shared:  # no trainable block: the head reads the frozen output, the same for all
        assert x is not None
        members = p[plan.head["classifier.weight"]].shape[0]
        x = x.unsqueeze(0).expand(members, *x.shape)
    assert x is not None
    return head(plan, p, x, noise)
