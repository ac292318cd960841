"""Trial arrays: K trials of the same structure trained as one stacked model (issue 21).

A small encoder's step is bound by the host's operator launches, not by the device's
arithmetic: K trials stacked along a member dimension launch the same kernels once for all K
(HFTA, Wang et al., MLSys 2021). What the members share, and what each has of its own:

- shared, the *structure* (:class:`Structure`): the model and its frozen weights, the unfreeze
  depth, the batch size, the data, the epochs and evaluation points, the pretraining-loss kind.
  The frozen bottom runs once per batch for the whole array (through the frozen-prefix cache);
- shared, the batch order: the array draws its batches as a trial with seed ``batch_seed``
  would (``loop.batch_order_seed``), and a member that joins at array position ``t`` sees
  them from there. A trial alone run with ``LoopSettings(batch_seed=..., batch_start=t)``
  sees exactly the member's batches (:meth:`TrialArray.alone_settings`);
- per member: learning rate and its schedule (``loop.learning_rate_factor``), weight decay,
  λ, warmup, dropout, label smoothing, gradient clipping, ``adam_beta2``, its seed (its
  dropout masks; its head was drawn by whoever built its adapter), its step count, its
  evaluations, best state and hooks.

The trainable weights of all members are rows of one ``[K, N]`` buffer (each parameter a view
into it, ``array_weights.py``), so clipping and the l2sp term are a few whole-buffer operations
a step whatever the parameter count, AdamW is torch's fused kernel twice per member, and a
member leaving or joining is a row removed or appended: no dead member computes. ``run`` trains until every member has left and ``refill`` has no
more to give; a member leaves when it finishes, when its hooks raise (a pruned trial), when
it diverges, or when its hooks ask it to stop (it hands over its ``TrainState``, which
``loop.train(resume=...)`` continues alone).

The math per member is ``loop.train``'s (AdamW with decay on weight matrices only, the same
schedule, clipping and loss), so a member's loss at every step equals the same trial's alone
to float rounding (tests/finetune/test_arrays.py). Text encoders of the BERT family only
(``array_layers.py``); ``pretrain_loss`` ``none`` or ``l2sp``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sweeper import record
from sweeper.errors import SweepError
from sweeper.finetune import array_layers, array_resnet, freeze, loop, metrics, prefix
from sweeper.finetune.array_weights import StackedWeights
from sweeper.finetune.data import PreparedData, evaluation_batches, training_batches
from sweeper.finetune.hyper import ARRAY_PRETRAIN_LOSSES
from sweeper.finetune.loop import Hooks, Hyper, LoopResult, LoopSettings, NonFiniteLoss, Preempted, TrainState
from sweeper.finetune.models import ModelAdapter

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Structure:
    """What every member of one array must share (besides the model and the settings)."""

    depth: int  # resolved unfreeze depth
    batch_size: int

    @classmethod
    def of(cls, hyper: Hyper, num_blocks: int) -> Structure:
        return cls(num_blocks if hyper.unfreeze_depth is None else hyper.unfreeze_depth, hyper.batch_size)


@dataclass
class Member:
    """One trial of an array."""

    key: Hashable  # the caller's name for it: a trial number
    adapter: ModelAdapter  # built as the trial alone builds it (its new head drawn after its seed)
    hyper: Hyper
    seed: int  # its dropout masks, seeded per step as loop.train seeds a trial's
    hooks: Hooks = field(default_factory=Hooks)

    def save(self, folder: Path, weights: dict[str, torch.Tensor], tokenizer: Any = None) -> None:
        """``weights`` (a result's ``best_model``, or a state's ``model``) into the member's
        own adapter, saved as an ordinary model folder (``from_pretrained`` loads it)."""
        loop.load_trained(self.adapter, weights)
        self.adapter.save(folder, tokenizer)


@dataclass
class MemberOutcome:
    """How a member left: its result, or the exception that ended it (a pruning, a
    divergence, ``Preempted``, anything its hooks raised)."""

    member: Member
    result: LoopResult | None
    error: BaseException | None
    batch_start: int  # the array position it joined at (what a retry alone needs)
    losses: list[float] = field(default_factory=list)  # its loss at every step, with ``trace``
    device_seconds: float = 0.0  # its share of the array's steps and evaluations


@dataclass
class _Slot:
    """A member's progress: everything loop.train keeps per trial."""

    member: Member
    joined: int  # array position of its step 0
    total: int
    warmup: int
    evaluate_at: set[int]
    names: list[str]  # its trainable parameters, in the buffer's order
    state: TrainState
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    samples: int = 0
    trace: list[torch.Tensor] = field(default_factory=list)
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # unchecked (step, loss)
    last_pretrain: torch.Tensor | None = None


class TrialArray:
    """K members trained as one model; see the module's docstring.

    ``settings`` is the array's: its ``seed`` is the batch order's seed (``batch_seed``) and
    nothing else; each member's seed is its own.
    """

    def __init__(self, data: PreparedData, settings: LoopSettings, structure: Structure, *,
                 trace: bool = False) -> None:
        if settings.pretrain_loss not in ARRAY_PRETRAIN_LOSSES:
            raise SweepError(
                f"trial arrays support pretrain_loss {' or '.join(ARRAY_PRETRAIN_LOSSES)}, not "
                f"{settings.pretrain_loss!r}: set array_size=1 for this study"
            )
        self.data, self.settings, self.structure, self.trace = data, settings, structure, trace
        self.device = settings.device
        self.position = 0  # batches the array has consumed: its step count
        self.member_steps = 0  # members' steps in all: over position, how full the array stayed
        self.batches_per_epoch = math.ceil(len(data.train) / structure.batch_size)
        self.total = max(1, int(round(settings.epochs * self.batches_per_epoch)))
        self.evaluate_at = loop._evaluation_steps(self.total, self.batches_per_epoch, settings)
        self.slots: list[_Slot] = []
        self.outcomes: list[MemberOutcome] = []
        self._base: ModelAdapter | None = None  # whose frozen bottom every member shares
        self._orders: dict[int, list[np.ndarray]] = {}
        self._lengths = data.train.lengths()
        self.buffers: StackedWeights | None = None
        self.stats: array_resnet.RunningStats | None = None  # a ResNet's, per member
        self.on_leave: Callable[[MemberOutcome], None] | None = None

    # ------------------------------------------------------------------ membership

    def add(self, member: Member) -> None:
        """``member`` joins at its own step 0 at the array's current position. A member of
        another structure raises SweepError: it belongs in another array (or alone)."""
        adapter, depth = member.adapter, self.structure.depth
        if Structure.of(member.hyper, adapter.num_blocks) != self.structure:
            raise SweepError(
                f"trial {member.key} has structure {Structure.of(member.hyper, adapter.num_blocks)}, "
                f"the array {self.structure}: it cannot join; train it in another array or alone"
            )
        problems = member.hyper.check(adapter.num_blocks)
        if problems:
            raise SweepError("; ".join(problems))
        trainable = freeze.apply(adapter, depth)
        names = {id(p): n for n, p in adapter.named_parameters()}
        start = freeze.first_trainable_block(depth, adapter.num_blocks)
        if self._base is None:
            # Only its frozen bottom runs here, in evaluation mode as a trial alone runs it
            # (freeze.set_train_mode): a torchvision model is built in training mode.
            self._base = adapter.to(self.device).eval()
            if adapter.kind == "image":  # grouped convolutions, per-member BatchNorm statistics
                self.plan: Any = array_resnet.resnet_plan(adapter, start)
                self.stats = array_resnet.RunningStats(self.plan.norms, self.device)
            else:
                self.plan = array_layers.text_plan(adapter, start)
            self.start = start
            self.caches = loop._Caches(adapter, self.data, start, self.settings, None)
            self.frozen_digest = prefix.weights_digest([adapter.stem, *adapter.blocks[:start]])
        elif start > 0 and prefix.weights_digest([adapter.stem, *adapter.blocks[:start]]) != self.frozen_digest:
            raise SweepError(f"trial {member.key}'s frozen weights differ from the array's: it cannot join")
        slot = _Slot(member, self.position, self.total, int(member.hyper.warmup_ratio * self.total),
                     self.evaluate_at, [names[id(p)] for p in trainable],
                     TrainState(0, 0, {}, {}, {}, [], None, None, {}, None))
        row = {n: p.detach() for n, p in adapter.named_parameters() if p.requires_grad}
        pretrained = set(freeze.pretrained_parameters(adapter, depth))
        if self.buffers is None:
            self.buffers = StackedWeights(slot.names, row, pretrained, self.device)
        self.buffers.append(row, member.hyper, _rates(member))
        if self.stats is not None:
            self.stats.join(adapter)
        self.slots.append(slot)

    def remove(self, key: Hashable) -> None:
        """The member ``key`` leaves now: its row of every stacked tensor is dropped."""
        index = next(i for i, s in enumerate(self.slots) if s.member.key == key)
        assert self.buffers is not None
        self.buffers.drop(index)
        if self.stats is not None:
            self.stats.leave(index)
        del self.slots[index]

    def alone_settings(self, key: Hashable) -> LoopSettings:
        """The settings under which ``loop.train`` trains member ``key`` on the batches it
        sees here (its resume state continues under them too)."""
        slot = next(s for s in self.slots if s.member.key == key)
        return replace(self.settings, seed=slot.member.seed, batch_seed=self.settings.seed, batch_start=slot.joined)

    # ------------------------------------------------------------------ the run

    def run(self, refill: Callable[[], Member | None] | None = None, capacity: int | None = None,
            on_leave: Callable[[MemberOutcome], None] | None = None) -> list[MemberOutcome]:
        """Train until no member is left. Before every step ``refill`` is asked for a member
        (None: nothing more to add) while the array holds fewer than ``capacity`` (by default
        as many as it holds now), so the array stays full for as long as the queue has trials.
        ``on_leave`` hears of each member as it leaves (a worker tells its trial there, not at
        the end of the array)."""
        capacity = len(self.slots) if capacity is None else capacity
        self.on_leave = on_leave
        with loop.attention_kernels():
            try:
                while True:
                    while refill is not None and len(self.slots) < capacity:
                        member = refill()
                        if member is None:
                            refill = None
                            break
                        self.add(member)
                    if not self.slots:
                        break
                    self._step()
            finally:
                prefix.release()
        return self.outcomes

    def _batch(self) -> np.ndarray:
        epoch, offset = divmod(self.position, self.batches_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: training_batches(
                self._lengths, self.structure.batch_size, seed=self.settings.seed * 1_000_003 + epoch)}
        return self._orders[epoch][offset]

    def _step(self) -> None:
        """One batch for every member: forward, backward, clipping, AdamW; then each
        member's evaluation point, stop request or end."""
        assert self.buffers is not None and self._base is not None
        tick = time.perf_counter()
        buffers, slots = self.buffers, self.slots
        indices = self._batch()
        if getattr(self.data.train, "augment", False):  # one augmented batch for all, as a retry alone draws it
            loop._seed_step(self.device, loop.augment_seed(self.settings.seed, self.position))
        batch = self.data.train.batch(indices, self.device)
        noise = self._noise(training=True)
        with loop._autocast(self.device, self.settings.bf16):
            hidden, mask = self._bottom(batch, indices, self.caches.prefix_train)
            logits = self._forward(buffers.views, self.stats, hidden, batch, mask, noise, training=True)
            smoothing = buffers.smoothing if any(h.label_smoothing > 0 for h in buffers.rows) else None
            task = _task_losses(logits, batch["labels"], smoothing)
        task.sum().backward()
        with torch.no_grad():
            drift = buffers.step([s.state.step for s in slots], [s.warmup for s in slots], self.total)
            loss = task.detach() + buffers.lam * drift
        self.position += 1
        self.member_steps += len(slots)
        if self.stats is not None:
            self.stats.trained()
        share = (time.perf_counter() - tick) / len(slots)  # the step's time, split evenly
        for k, slot in enumerate(slots):
            slot.state.step += 1
            slot.samples += len(indices)
            slot.train_seconds += share
            slot.pending.append((slot.state.step, loss[k]))
            if self.trace:
                slot.trace.append(loss[k])
            if self.settings.pretrain_loss != "none":
                slot.last_pretrain = drift[k]
        self._after_step()

    def _after_step(self) -> None:
        every = max(1, self.settings.check_every_steps)
        leaving: dict[int, tuple[LoopResult | None, BaseException | None]] = {}
        due = [k for k, s in enumerate(self.slots) if s.state.step in s.evaluate_at]
        for k, slot in enumerate(self.slots):
            if slot.state.step in slot.evaluate_at or slot.state.step % every == 0 or slot.state.step >= slot.total:
                error = _check(slot)
                if error is not None:
                    leaving[k] = (None, error)
        due = [k for k in due if k not in leaving]
        if due:
            self._evaluation_point(due, leaving)
        for k, slot in enumerate(self.slots):
            if k in leaving:
                continue
            if slot.member.hooks.should_stop():
                slot.member.hooks.stopped(self.snapshot(k))
                leaving[k] = (None, Preempted(f"stopped at step {slot.state.step} of {slot.total}"))
            elif slot.state.step >= slot.total:
                leaving[k] = (self._result(slot), None)
        for k in sorted(leaving, reverse=True):
            slot = self.slots[k]
            result, error = leaving[k]
            traced = [float(x) for x in torch.stack(slot.trace).cpu()] if slot.trace else []
            outcome = MemberOutcome(slot.member, result, error, slot.joined, traced,
                                    slot.train_seconds + slot.eval_seconds)
            self.outcomes.append(outcome)
            logger.info("trial %s leaves the array at step %d (%s)", slot.member.key, slot.state.step,
                        "finished" if error is None else type(error).__name__)
            self.remove(slot.member.key)
            if self.on_leave is not None:
                self.on_leave(outcome)

    def _evaluation_point(self, due: list[int], leaving: dict[int, Any]) -> None:
        """Score the members in ``due`` on the validation split together; keep each one's
        best; tell each one's hooks, whose exception (a pruning) makes it leave."""
        loop._sync(self.device)
        tick = time.perf_counter()
        scores = self.evaluate(due)
        spent = (time.perf_counter() - tick) / len(due)
        direction = record.direction_of(self.settings.direction)
        for k, figures in zip(due, scores):
            slot, state = self.slots[k], self.slots[k].state
            slot.eval_seconds += spent
            hooks = slot.member.hooks
            hooks.timed(slot.train_seconds, slot.eval_seconds, slot.samples)
            value = figures[self.settings.metric]
            state.evaluations += 1
            state.history.append((state.evaluations, value))
            improved = record.better(value, state.best_value, direction)
            if improved:
                state.best_value, state.best_evaluation, state.best_metrics = value, state.evaluations, figures
                state.best_model = self.trained(k)
            try:
                hooks.evaluated(state.evaluations, value, figures, improved, functools.partial(self.snapshot, k))
            except Exception as exc:  # optuna.TrialPruned, or the hooks' own failure: this member only
                leaving[k] = (None, exc)

    @torch.no_grad()
    def evaluate(self, members: list[int]) -> list[dict[str, float]]:
        """``loop.evaluate``'s figures for each of ``members`` (slot indices), in one pass."""
        assert self.buffers is not None
        split, device = self.data.validation, self.device
        rows = self.buffers.flat.index_select(0, torch.tensor(members, device=device))
        views = self.buffers.split(rows)
        stats = self.stats.subset(members) if self.stats is not None else None
        noise = self._noise(training=False)
        predictions: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        loss_sum = torch.zeros(len(members), dtype=torch.float64, device=device)
        with loop._autocast(device, self.settings.bf16):
            for indices in evaluation_batches(split.lengths(), max(self.structure.batch_size, 64)):
                batch = split.batch(indices, device)
                hidden, mask = self._bottom(batch, indices, self.caches.prefix_validation)
                logits = _full(self._forward(views, stats, hidden, batch, mask, noise, training=False))
                gold = batch["labels"].unsqueeze(0).expand(len(members), -1)
                loss_sum += F.cross_entropy(logits.transpose(1, 2), gold, reduction="none").double().sum(1)
                predictions.append(logits.argmax(-1))
                labels.append(batch["labels"])
        if not labels:
            raise SweepError("the validation split is empty: raise `data.validation_fraction`")
        gold_all = torch.cat(labels).cpu().numpy()
        guessed = torch.cat(predictions, 1).cpu().numpy()
        losses = (loss_sum / len(gold_all)).cpu().tolist()
        return [metrics.compute(guessed[i], gold_all, losses[i], self.data.num_labels) for i in range(len(members))]

    def _bottom(self, batch: dict[str, torch.Tensor], indices: np.ndarray,
                store: prefix.FeatureStore | None) -> tuple[torch.Tensor | None, Any]:
        """The frozen bottom's output, shared by every member (from the prefix cache where
        it holds the batch), and the attention mask; at full depth no output, only the mask."""
        adapter, start = self._base, self.start
        assert adapter is not None
        if start == 0 and self.stats is not None:
            return None, None  # a ResNet's stem trains: the members' own pixels through it
        if start == 0:
            ids = batch["input_ids"]
            shape_only = torch.empty(*ids.shape, self.plan_width, device=ids.device)
            return None, adapter.context(batch, shape_only)[0]
        if store is not None and store.has(indices):
            hidden = store.gather(indices)
        else:
            with torch.no_grad():
                hidden, context = adapter.embed(batch)
                hidden = adapter.run(hidden, context, adapter.blocks[:start])
            if store is not None:
                store.store(indices, hidden)
        return hidden, (adapter.context(batch, hidden) or [None])[0]

    def _forward(self, views: dict[str, torch.Tensor], stats: array_resnet.RunningStats | None,
                 hidden: torch.Tensor | None, batch: dict[str, torch.Tensor], mask: Any,
                 noise: array_layers.Noise, training: bool) -> torch.Tensor:
        """Logits [K, B, labels] of the members ``views`` holds."""
        if stats is not None:
            return array_resnet.forward(self.plan, views, stats, hidden, batch, training)
        return array_layers.forward(self.plan, views, hidden, batch, mask, noise)

    @property
    def plan_width(self) -> int:
        assert self._base is not None
        return int(self._base.config.hidden_size)  # type: ignore[attr-defined]

    def _noise(self, training: bool) -> array_layers.Noise:
        assert self.buffers is not None
        rates = self.buffers.rates
        generators = []
        if training and any(p > 0 for member in rates for p in member):
            for slot in self.slots:  # each member's masks from its own seed and step, as loop seeds them
                generator = torch.Generator(device=self.device)
                generator.manual_seed(slot.member.seed * 1_000_003 + slot.state.step)
                generators.append(generator)
        hidden, attention, classifier = ([member[i] for member in rates] for i in range(3))
        return array_layers.Noise(hidden, attention, classifier, generators, training=training and bool(generators))

    # ------------------------------------------------------------------ what a member hands over

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s trainable weights now, by the model's names, on the CPU (one copy
        of its row, cut into views)."""
        assert self.buffers is not None
        return self.buffers.split(self.buffers.flat[k].detach().to("cpu", copy=True))

    def trained(self, k: int) -> dict[str, torch.Tensor]:
        """What training changed of member ``k``: its weights, and a ResNet's BatchNorm
        statistics (as ``loop.train``'s best model and resume state hold them)."""
        found = self.weights(k)
        if self.stats is not None:
            found.update(self.stats.of(k))
        return found

    def snapshot(self, k: int) -> TrainState:
        """Member ``k``'s resume state, in the form ``loop.train(resume=...)`` loads."""
        assert self.buffers is not None
        slot, buffers = self.slots[k], self.buffers
        state = slot.state
        adapter = slot.member.adapter
        params = dict(adapter.named_parameters())
        trainable = [params[n] for n in slot.names]
        optimizer = loop._optimizer(adapter, trainable, slot.member.hyper)
        for name, p in zip(slot.names, trainable):
            first, second = buffers.moments(name, k)
            optimizer.state[p] = {"step": torch.tensor(float(state.step)), "exp_avg": first, "exp_avg_sq": second}
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: loop.learning_rate_factor(s, slot.warmup, slot.total))
        factor = loop.learning_rate_factor(state.step, slot.warmup, slot.total)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        scheduler.last_epoch, scheduler._step_count = state.step, state.step + 1
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        return TrainState(
            state.step, state.evaluations, self.trained(k), optimizer.state_dict(), scheduler.state_dict(),
            list(state.history), state.best_value, state.best_evaluation, dict(state.best_metrics),
            state.best_model,
        )

    def _result(self, slot: _Slot) -> LoopResult:
        state = slot.state
        assert state.best_value is not None and state.best_model is not None
        return LoopResult(
            best_value=state.best_value, best_evaluation=state.best_evaluation or 0,
            best_metrics=state.best_metrics, best_model=state.best_model, history=state.history,
            steps=state.step, train_seconds=slot.train_seconds, eval_seconds=slot.eval_seconds,
            samples=slot.samples,
            pretrain_loss_last=float(slot.last_pretrain) if slot.last_pretrain is not None else None,
        )


def _rates(member: Member) -> tuple[float, float, float]:
    """The member's dropout rates (hidden, attention, classifier), as its own model has them."""
    if member.adapter.kind == "image":
        return (0.0, 0.0, 0.0)  # a ResNet has no dropout
    config = member.adapter.model.config
    classifier = getattr(member.adapter.model, "dropout", None)
    return (float(config.hidden_dropout_prob), float(config.attention_probs_dropout_prob),
            float(classifier.p) if classifier is not None else 0.0)


def _task_losses(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor | None) -> torch.Tensor:
    """Each member's ``losses.task_loss`` ([K]): cross-entropy with its own label smoothing,
    (1 − ε)·NLL + ε·mean over classes of −log p, as ``F.cross_entropy`` defines it."""
    logp = torch.log_softmax(_full(logits), dim=-1)
    nll = -logp.gather(2, labels.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(2).mean(1)
    if smoothing is None:  # no member smooths
        return nll
    uniform = -logp.mean(2).mean(1)
    return (1 - smoothing) * nll + smoothing * uniform


def _full(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 at least (bf16 under autocast), as the loss and the metrics read them."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _check(slot: _Slot) -> BaseException | None:
    """loop._LossWatch's check for one member: its first non-finite loss since the last."""
    pending, slot.pending = slot.pending, []
    if not pending:
        return None
    finite = torch.isfinite(torch.stack([loss for _, loss in pending])).cpu()
    if bool(finite.all()):
        return None
    step, loss = pending[int((~finite).nonzero()[0])]
    return NonFiniteLoss(
        f"the loss became {loss.item()} at step {step} with learning_rate "
        f"{slot.member.hyper.learning_rate:.3g}: the trial diverged; narrow `space.learning_rate` if many trials do this"
    )
