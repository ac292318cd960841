"""The trainable weights of a trial array's members as one ``[K, N]`` buffer, and the
per-member AdamW that updates them (``arrays.py`` uses it).

Every parameter is a view into the buffer (the member dimension first), so the gradient is
gathered, clipped and given its l2sp term in a few operations on the whole buffer whatever
the parameter count, the update is torch's fused AdamW kernel twice per member (the decayed
and the undecayed segment of its row), and a member leaving or joining is one row removed or
appended. The arithmetic is ``torch.optim.AdamW``'s (``loop._optimizer``: decay on weight
matrices only, β1 = 0.9, ε = 1e-8; the same kernel, so the same bits) and ``clip_grad_norm_``'s,
each with the member's own values; the l2sp term's gradient, 2λ(w − w⁰)/Σ‖w⁰‖², is added in
closed form instead of through autograd (the same value, without a backward pass over every
parameter).
"""

from __future__ import annotations

import numpy as np
import torch

from sweeper.finetune import loop
from sweeper.finetune.loop import Hyper

_BETA1, _EPS = 0.9, 1e-8  # AdamW's, as loop._optimizer sets them


class StackedWeights:
    """Every member's trainable weights as one ``[K, N]`` buffer (parameters are views of
    it), AdamW's moments likewise, and the per-member hyperparameters as columns."""

    def __init__(self, names: list[str], row: dict[str, torch.Tensor], pretrained: set[str],
                 device: torch.device) -> None:
        # Weight matrices first, then biases and norms: each member's row is then two
        # contiguous segments, the one AdamW decays and the one it does not (loop._optimizer).
        names = [n for n in names if row[n].dim() >= 2] + [n for n in names if row[n].dim() < 2]
        self.names, self.device = names, device
        self.dtype = row[names[0]].dtype if names else torch.float32  # the model's (fp32; fp64 in exactness tests)
        self.decayed = int(sum(row[n].numel() for n in names if row[n].dim() >= 2))
        self.rows: list[Hyper] = []  # each member's hyperparameters, as Python numbers
        self.rates: list[tuple[float, float, float]] = []  # its dropout: hidden, attention, classifier
        self.shapes = [tuple(row[n].shape) for n in names]
        sizes = [int(row[n].numel()) for n in names]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        width = int(self.offsets[-1])
        self.pretrained = torch.zeros(width, device=device, dtype=self.dtype)
        for n, a, b in zip(names, self.offsets[:-1], self.offsets[1:]):
            if n in pretrained:
                self.pretrained[a:b] = 1.0
        empty = torch.zeros(0, width, device=device, dtype=self.dtype)
        self.flat, self.first, self.second, self.start = empty, empty.clone(), empty.clone(), empty.clone()
        self.norm = torch.zeros(0, device=device, dtype=self.dtype)  # Σ‖w⁰‖² per member (l2sp)
        columns = ("lr", "wd", "beta2", "clip", "smoothing", "lam")
        self.hyper = torch.zeros(0, len(columns), device=device, dtype=self.dtype)
        self.views: dict[str, torch.Tensor] = {}

    def _col(self, i: int) -> torch.Tensor:
        return self.hyper[:, i : i + 1]

    @property
    def smoothing(self) -> torch.Tensor:
        return self.hyper[:, 4]

    @property
    def lam(self) -> torch.Tensor:
        return self.hyper[:, 5]

    def append(self, row: dict[str, torch.Tensor], hyper: Hyper, rates: tuple[float, float, float]) -> None:
        flat = torch.cat([row[n].reshape(-1).to(self.device, self.dtype) for n in self.names]).unsqueeze(0)
        zeros = torch.zeros_like(flat)
        norm = float((flat.double() * self.pretrained.double()).pow(2).sum()) or 1.0
        self.rows.append(hyper)
        self.rates.append(rates)
        values = torch.tensor([[hyper.learning_rate, hyper.weight_decay, hyper.adam_beta2, hyper.max_grad_norm,
                                hyper.label_smoothing, hyper.pretrain_loss_weight]], device=self.device,
                              dtype=self.dtype)
        self._rebuild(torch.cat([self.flat, flat]), torch.cat([self.first, zeros]), torch.cat([self.second, zeros]),
                      torch.cat([self.start, flat.clone()]), torch.cat([self.norm, torch.tensor([norm], device=self.device, dtype=self.dtype)]),
                      torch.cat([self.hyper, values]))

    def drop(self, index: int) -> None:
        del self.rows[index]
        del self.rates[index]
        keep = torch.tensor([i for i in range(self.flat.shape[0]) if i != index], dtype=torch.long, device=self.device)
        self._rebuild(*(t.index_select(0, keep) for t in (self.flat, self.first, self.second, self.start, self.norm,
                                                           self.hyper)))

    def _rebuild(self, flat: torch.Tensor, first: torch.Tensor, second: torch.Tensor, start: torch.Tensor,
                 norm: torch.Tensor, hyper: torch.Tensor) -> None:
        self.flat, self.first, self.second, self.start = flat.contiguous(), first, second, start
        self.norm, self.hyper = norm, hyper
        members = self.flat.shape[0]
        self.views = {}
        for n, shape, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:]):
            # A view of a buffer that needs no gradient is a leaf: autograd fills its .grad
            # while every update is one operation on the whole buffer.
            self.views[n] = self.flat[:, a:b].view(members, *shape).requires_grad_(True)

    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rows`` of the buffer ([K', N], or one row [N]) as the parameters' views."""
        lead = rows.shape[:-1]
        return {n: rows[..., a:b].view(*lead, *shape)
                for n, shape, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])}

    def moments(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.names.index(name)
        a, b, shape = self.offsets[i], self.offsets[i + 1], self.shapes[i]
        return (self.first[k, a:b].reshape(shape).cpu().clone(), self.second[k, a:b].reshape(shape).cpu().clone())

    def step(self, steps: list[int], warmups: list[int], total: int) -> torch.Tensor:
        """Per member: the l2sp gradient added, clipping, one AdamW step at its scheduled
        rate (``steps`` are the members' steps before this one). Returns each member's l2sp
        drift before the update (its loss term, λ aside; zeros where no member has a λ)."""
        members = len(steps)
        grads = torch.cat([self.views[n].grad.reshape(members, -1) for n in self.names], 1)  # type: ignore[union-attr]
        for view in self.views.values():
            view.grad = None
        drift = torch.zeros(members, device=self.device)
        if any(h.pretrain_loss_weight > 0 for h in self.rows):  # d(λ·drift/norm)/dw = 2λ(w − w⁰)/norm
            drift_vector = (self.flat - self.start) * self.pretrained
            drift = drift_vector.pow(2).sum(1) / self.norm
            grads = grads + drift_vector * (2 * self._col(5) / self.norm.unsqueeze(1))
        if any(h.max_grad_norm > 0 for h in self.rows):  # clip_grad_norm_, each member to its own norm
            clip = self._col(3)
            total_norm = torch.linalg.vector_norm(grads, 2, dim=1, keepdim=True)
            coefficient = torch.clamp(clip / (total_norm + 1e-6), max=1.0)
            grads = grads * torch.where(clip > 0, coefficient, torch.ones_like(coefficient))
        # torch's own fused AdamW kernel (what loop._optimizer runs), once per member and
        # segment: one pass over the memory, where a whole-buffer update with per-member
        # columns made a dozen (on a CPU, MiniLM's update took longer than its backward pass).
        counts = torch.tensor([s + 1 for s in steps], dtype=torch.float32, device=self.device)
        segments = ((0, self.decayed, True), (self.decayed, self.flat.shape[1], False))
        for k, (hyper, step, warmup) in enumerate(zip(self.rows, steps, warmups)):
            lr = hyper.learning_rate * loop.learning_rate_factor(step, warmup, total)
            for a, b, decays in segments:
                if b > a:
                    torch._fused_adamw_(
                        [self.flat[k, a:b]], [grads[k, a:b]], [self.first[k, a:b]], [self.second[k, a:b]], [],
                        [counts[k]], lr=lr, beta1=_BETA1, beta2=hyper.adam_beta2,
                        weight_decay=hyper.weight_decay if decays else 0.0, eps=_EPS, amsgrad=False, maximize=False,
                    )
        return drift
