"""The trainable top of a torchvision ResNet for K trials at once, as grouped convolutions.

The K members' feature maps lie side by side along the channels, ``[N, K·C, H, W]`` (member
``k``'s channels at ``k·C .. k·C + C − 1``). A convolution of every member is then one
``conv2d`` with ``K`` times the groups, its weight the members' weights one after another;
a BatchNorm of every member is one ``batch_norm`` over the ``K·C`` channels, whose statistics
per channel are each member's own statistics per channel: the same numbers, and running
statistics that stay each member's. ReLU, max-pooling, the residual sum and the average
pool act per channel, so they need nothing. The classifier is one batched matmul. The
order of operations is torchvision's (``BasicBlock``, ``Bottleneck``, ``ResNet._forward_impl``),
so a member trains as the same trial alone to float rounding (tests/finetune/test_array_resnet.py).

A ResNet has no dropout; augmentation is drawn once per batch for the whole array, seeded by
the batch order (``loop.augment_seed``), as a member's retry alone draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sweeper.errors import SweepError
from sweeper.finetune.array_layers import linear, shared_linear
from sweeper.finetune.models import ModelAdapter, ResNetAdapter


@dataclass
class ConvNorm:
    """A convolution and the BatchNorm after it, by the model's parameter names."""

    weight: str
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    norm: str  # the BatchNorm module's name: its weight, bias and running statistics follow
    eps: float
    momentum: float


@dataclass
class BlockPlan:
    path: list[ConvNorm]  # the main path, a ReLU after each but the last
    downsample: ConvNorm | None


@dataclass
class ResNetPlan:
    start: int  # the lowest trainable block; 0 = the stem trains too
    stem: ConvNorm | None
    pool: nn.MaxPool2d | None
    blocks: list[BlockPlan]
    fc_weight: str
    fc_bias: str
    norms: list[str]  # every trainable BatchNorm, whose running statistics are per member


def resnet_plan(adapter: ModelAdapter, start: int) -> ResNetPlan:
    """The plan of ``adapter``'s top from block ``start``, or a SweepError saying why it
    cannot be stacked."""
    if not isinstance(adapter, ResNetAdapter):
        raise SweepError(f"this stack is for torchvision ResNets, not a {adapter.kind} model")
    model = adapter.model
    names = {id(m): n for n, m in model.named_modules()}

    def pair(conv: nn.Module, norm: nn.Module) -> ConvNorm:
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d) or conv.bias is not None \
                or norm.momentum is None or not norm.affine or not norm.track_running_stats:
            raise SweepError(f"trial arrays stack torchvision's ResNet blocks; {type(model).__name__} differs "
                             f"at {names.get(id(conv))}: run it with array_size=1")
        return ConvNorm(f"{names[id(conv)]}.weight", tuple(conv.stride), tuple(conv.padding),  # type: ignore[arg-type]
                        tuple(conv.dilation), conv.groups, names[id(norm)], norm.eps, float(norm.momentum))

    blocks = []
    for block in adapter.blocks[start:]:
        convs = [getattr(block, f"conv{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
        norms = [getattr(block, f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"bn{i}")]
        down = None
        sample: Any = block.downsample  # torchvision's nn.Sequential(conv, BatchNorm) or None
        if sample is not None:
            down = pair(sample[0], sample[1])
        blocks.append(BlockPlan([pair(c, n) for c, n in zip(convs, norms)], down))
    stem = pair(model.conv1, model.bn1) if start == 0 else None
    norms = [p.norm for b in blocks for p in [*b.path, *([b.downsample] if b.downsample else [])]]
    return ResNetPlan(start, stem, model.maxpool if start == 0 else None, blocks, "fc.weight", "fc.bias",
                      ([stem.norm] if stem else []) + norms)


class RunningStats:
    """The trainable BatchNorms' running statistics of every member, as ``[K·C]`` buffers
    that ``batch_norm`` updates in place (member ``k`` at rows ``k·C ..``)."""

    def __init__(self, norms: list[str], device: torch.device) -> None:
        self.norms, self.device = norms, device
        self.mean: dict[str, torch.Tensor] = {}
        self.var: dict[str, torch.Tensor] = {}
        self.tracked: list[dict[str, int]] = []  # per member: num_batches_tracked at its join
        self.steps: list[int] = []  # training forwards since it joined

    def join(self, adapter: ModelAdapter) -> None:
        buffers = dict(adapter.model.named_buffers())
        for norm in self.norms:
            mean = buffers[f"{norm}.running_mean"].detach().to(self.device)
            var = buffers[f"{norm}.running_var"].detach().to(self.device)
            self.mean[norm] = torch.cat([self.mean[norm], mean]) if norm in self.mean else mean.clone()
            self.var[norm] = torch.cat([self.var[norm], var]) if norm in self.var else var.clone()
        self.tracked.append({n: int(buffers[f"{n}.num_batches_tracked"]) for n in self.norms})
        self.steps.append(0)

    def leave(self, index: int) -> None:
        members = len(self.steps)
        for table in (self.mean, self.var):
            for norm, rows in table.items():
                kept = rows.view(members, -1)
                table[norm] = torch.cat([kept[:index], kept[index + 1:]]).reshape(-1).contiguous()
        del self.tracked[index], self.steps[index]

    def subset(self, members: list[int]) -> RunningStats:
        """A copy holding only ``members`` (slot indices), for an evaluation of some of them."""
        count = len(self.steps)
        part = RunningStats(self.norms, self.device)
        pick = torch.tensor(members, device=self.device)
        part.mean = {n: t.view(count, -1).index_select(0, pick).reshape(-1) for n, t in self.mean.items()}
        part.var = {n: t.view(count, -1).index_select(0, pick).reshape(-1) for n, t in self.var.items()}
        part.tracked = [self.tracked[k] for k in members]
        part.steps = [self.steps[k] for k in members]
        return part

    def trained(self) -> None:
        self.steps = [s + 1 for s in self.steps]

    def of(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s statistics, by the model's buffer names, on the CPU."""
        members = len(self.steps)
        found: dict[str, torch.Tensor] = {}
        for norm in self.norms:
            found[f"{norm}.running_mean"] = self.mean[norm].view(members, -1)[k].cpu().clone()
            found[f"{norm}.running_var"] = self.var[norm].view(members, -1)[k].cpu().clone()
            found[f"{norm}.num_batches_tracked"] = torch.tensor(self.tracked[k][norm] + self.steps[k])
        return found


def conv_norm(spec: ConvNorm, p: dict[str, torch.Tensor], stats: RunningStats, x: torch.Tensor,
              training: bool) -> torch.Tensor:
    """Every member's convolution then BatchNorm, on ``x`` ``[N, K·C, H, W]``."""
    weight = p[spec.weight]
    members = weight.shape[0]
    y = F.conv2d(x, weight.reshape(members * weight.shape[1], *weight.shape[2:]), None, spec.stride,
                 spec.padding, spec.dilation, spec.groups * members)
    return F.batch_norm(y, stats.mean[spec.norm], stats.var[spec.norm], p[f"{spec.norm}.weight"].reshape(-1),
                        p[f"{spec.norm}.bias"].reshape(-1), training, spec.momentum, spec.eps)


def forward(plan: ResNetPlan, p: dict[str, torch.Tensor], stats: RunningStats, hidden: torch.Tensor | None,
            batch: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
    """Logits [K, N, classes] of the trainable top: from the frozen bottom's output
    ``hidden`` ([N, C, H, W], shared), or from the pixels at full depth."""
    members = p[plan.fc_weight].shape[0]
    if hidden is None:
        assert plan.stem is not None and plan.pool is not None
        x = batch["pixel_values"].repeat(1, members, 1, 1)
        x = F.relu(conv_norm(plan.stem, p, stats, x, training))
        x = F.max_pool2d(x, plan.pool.kernel_size, plan.pool.stride, plan.pool.padding, plan.pool.dilation,
                         ceil_mode=plan.pool.ceil_mode)
    elif plan.blocks:
        x = hidden.repeat(1, members, 1, 1)
    else:  # a linear probe: every member's head reads the same pooled features
        pooled = torch.flatten(F.adaptive_avg_pool2d(hidden, 1), 1)
        return shared_linear(pooled, p[plan.fc_weight], p[plan.fc_bias])
    for block in plan.blocks:
        out = x
        for i, spec in enumerate(block.path):
            out = conv_norm(spec, p, stats, out, training)
            if i < len(block.path) - 1:
                out = F.relu(out)
        identity = conv_norm(block.downsample, p, stats, x, training) if block.downsample else x
        x = F.relu(out + identity)
    pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [N, K·C]
    rows = pooled.view(pooled.shape[0], members, -1).transpose(0, 1)  # [K, N, C]
    return linear(rows, p[plan.fc_weight], p[plan.fc_bias])
