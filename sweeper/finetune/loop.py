"""The training loop of one trial: read top to bottom.

AdamW on the trainable parameters only (weight decay on weight matrices, not on biases and
norms), linear warmup then linear decay (:func:`learning_rate_factor`), bf16 autocast on
CUDA and fp32 on CPU, evaluation on the validation split at fixed points, deterministic
seeds. Length-bucketed batches keep padding small (``data.training_batches``).

What keeps the accelerator busy (issue 7): the frozen bottom of a trial below full depth runs
once per example, not once per epoch (``prefix.py``); the step never waits for the device
(the loss is checked for NaN/inf every ``check_every_steps`` steps and at each evaluation,
not after every step, and timings are taken at evaluation points only); on CUDA the next
batch can be padded and copied from pinned memory on a thread while the current step runs
(``prefetch``, off by default). None of these changes what is computed, only when and how
often. With ``compile``, the trainable blocks run through ``torch.compile`` (``compiled.py``),
which changes float rounding and dropout's random draws, nothing else.

The loop knows nothing of Optuna: it calls its :class:`Hooks` after every evaluation (where
the objective reports, prunes and saves), and asks them after every step whether to stop
(preemption), in which case it hands over a :class:`TrainState` to resume from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sweeper import record
from sweeper.errors import SweepError
from sweeper.finetune import compiled, freeze, losses, metrics, prefix
from sweeper.finetune.data import PreparedData, evaluation_batches, training_batches
from sweeper.finetune.hyper import Hyper
from sweeper.finetune.models import BlockCall, ModelAdapter

logger = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    epochs: float  # passes over the training split (fractions allowed: 0.5 = half an epoch)
    metric: str  # one of metrics.METRICS: the validation figure the sweep optimises
    direction: str  # "maximize" or "minimize", as a study file says it (record.direction_of)
    device: torch.device
    seed: int  # the trial's seed: batch order, dropout, head initialisation
    # The batch order's seed and first position, where they are not the trial's own: a member
    # of a trial array (arrays.py) sees the array's batches from where it joined, and a trial
    # alone given the same two sees the same batches. None/0 = the trial's seed, from the start.
    batch_seed: int | None = None
    batch_start: int = 0  # batches of the order skipped before step 0, >= 0
    pretrain_loss: str = "none"
    evals_per_epoch: int = 1  # evaluations on the validation split per epoch
    eval_every_steps: int | None = None  # instead: evaluate every N steps
    bf16: bool = True  # bf16 autocast where the device supports it (CUDA); CPU runs fp32
    log_every_seconds: float = 30.0
    cache_prefix: bool = True  # reuse the frozen bottom's outputs across epochs and trials (prefix.py)
    prefix_cache_dtype: str = "auto"  # auto (fp32, or bf16 under bf16 autocast), float32, bfloat16, float16
    prefix_cache_gib: float = 4.0  # memory the cached features of one worker process may take, GiB
    check_every_steps: int = 32  # steps between NaN/inf checks of the loss (each waits for the device), 1..1000
    # Pad the next batch on a thread during the step. Off by default: on an H100 the thread's
    # share of the GIL cost the launch-bound loop 13-15% (bench/README.md, throughput).
    prefetch: bool = False
    # The trainable blocks through torch.compile (compiled.py): fewer, fused kernels a step.
    compile: bool = False
    compile_backend: str = "inductor"  # compiled.BACKENDS; "aot_eager" traces without generating code
    compile_mode: str | None = None  # compiled.MODES: "reduce-overhead" adds CUDA graphs (bench only)


@dataclass
class TrainState:
    """Everything a preempted or killed trial needs to continue where it stopped."""

    step: int
    evaluations: int
    model: dict[str, torch.Tensor]  # trainable parameters, by the model's own names
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: list[tuple[int, float]]  # (evaluation index, validation value)
    best_value: float | None
    best_evaluation: int | None
    best_metrics: dict[str, float]
    best_model: dict[str, torch.Tensor] | None


@dataclass
class LoopResult:
    best_value: float
    best_evaluation: int
    best_metrics: dict[str, float]
    best_model: dict[str, torch.Tensor]  # trainable parameters and trained buffers at the best evaluation, on CPU
    history: list[tuple[int, float]]
    steps: int
    train_seconds: float
    eval_seconds: float
    samples: int
    resumed_from_step: int = 0
    pretrain_loss_last: float | None = None

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0


class Hooks:
    """What the loop tells its caller; the defaults do nothing."""

    def evaluated(
        self, evaluation: int, value: float, all_metrics: dict[str, float], improved: bool,
        snapshot: Callable[[], TrainState],
    ) -> None:
        """After each evaluation. May raise ``optuna.TrialPruned`` to stop the trial."""

    def should_stop(self) -> bool:
        """Asked after every step: True hands the state to :meth:`stopped` and ends the loop."""
        return False

    def stopped(self, state: TrainState) -> None:
        """The loop was asked to stop; ``state`` resumes it."""

    def timed(self, train_seconds: float, eval_seconds: float, samples: int) -> None:
        """The time spent so far, told at every evaluation point before ``evaluated``: a
        trial pruned there still has its timings."""

    def progress(self, message: str) -> None:
        logger.info(message)


class Preempted(Exception):
    """The loop stopped on request after saving its state."""


class NonFiniteLoss(SweepError):
    pass


def train(
    adapter: ModelAdapter,
    data: PreparedData,
    hyper: Hyper,
    settings: LoopSettings,
    hooks: Hooks | None = None,
    resume: TrainState | None = None,
    *,
    lm_head: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> LoopResult:
    try:
        with attention_kernels():
            return _train(adapter, data, hyper, settings, hooks, resume, lm_head, tokenizer)
    finally:
        prefix.release()  # this trial's cached features may now make room for another's


def _train(
    adapter: ModelAdapter,
    data: PreparedData,
    hyper: Hyper,
    settings: LoopSettings,
    hooks: Hooks | None,
    resume: TrainState | None,
    lm_head: torch.nn.Module | None,
    tokenizer: Any,
) -> LoopResult:
    hooks = hooks or Hooks()
    device = settings.device

    # -------------------------------------------------------------------- the model
    # What trains (the top `depth` blocks and the head), the loss terms, the caches.
    depth = adapter.num_blocks if hyper.unfreeze_depth is None else hyper.unfreeze_depth
    trainable = freeze.apply(adapter, depth)
    start = freeze.first_trainable_block(depth, adapter.num_blocks)
    adapter.to(device)
    # The pretraining term snapshots the pretrained weights: build it before a resume loads.
    pretrain = losses.build(settings.pretrain_loss, adapter, depth, lm_head=lm_head,
                            tokenizer=tokenizer, seed=settings.seed)
    use_pretrain = settings.pretrain_loss != "none" and hyper.pretrain_loss_weight > 0
    autocast = _autocast(device, settings.bf16)
    caches = _Caches(adapter, data, start, settings, pretrain if use_pretrain else None)
    call = (compiled.block_call(adapter, settings.compile_backend, settings.compile_mode)
            if settings.compile else None)

    # -------------------------------------------------------------------- steps, optimizer, schedule
    batches_per_epoch, total_steps, evaluate_at = schedule_of(len(data.train), hyper.batch_size, settings)
    optimizer = _optimizer(adapter, trainable, hyper)
    warmup = int(hyper.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, warmup, total_steps)
    )

    # -------------------------------------------------------------------- resume
    state = TrainState(0, 0, {}, {}, {}, [], None, None, {}, None)
    names = {id(p): n for n, p in adapter.named_parameters()}
    buffers = freeze.trained_buffers(adapter, depth)
    if resume is not None:
        # The optimizer's hyperparameters stay this trial's: a PBT segment (pbt.py) goes on from
        # another trial's weights and moments with its own; for a retry they are the same values.
        own = [{key: group[key] for key in ("initial_lr", "weight_decay", "betas")} for group in optimizer.param_groups]
        load_trained(adapter, resume.model)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        for group, values in zip(optimizer.param_groups, own, strict=True):
            group.update(values)
            group["lr"] = values["initial_lr"] * learning_rate_factor(scheduler.last_epoch, warmup, total_steps)
        scheduler.base_lrs = [values["initial_lr"] for values in own]
        state = resume
        logger.info("resuming at step %d of %d", state.step, total_steps)
    resumed_from = state.step

    def snapshot() -> TrainState:
        return TrainState(
            step, state.evaluations, trained_state(trainable, names, buffers),
            optimizer.state_dict(), scheduler.state_dict(), list(state.history), state.best_value,
            state.best_evaluation, dict(state.best_metrics), state.best_model,
        )

    direction = record.direction_of(settings.direction)
    step, samples, train_seconds, eval_seconds = state.step, 0, 0.0, 0.0

    # -------------------------------------------------------------------- training
    last_log, last_pretrain = time.perf_counter(), None
    losses_seen = _LossWatch(hyper, max(1, settings.check_every_steps))
    lengths = data.train.lengths()
    segment = time.perf_counter()  # training time is taken between evaluation points

    def evaluation_point() -> None:
        """Score the validation split, keep the model if it is the best so far, and tell the
        hooks (which may prune the trial here). The time it takes counts as evaluation."""
        nonlocal train_seconds, eval_seconds, segment
        _sync(device)
        train_seconds += time.perf_counter() - segment
        tick = time.perf_counter()
        scores = evaluate(adapter, data.validation, device, settings.bf16, data.num_labels,
                          hyper.batch_size, start=start, store=caches.prefix_validation)
        freeze.set_train_mode(adapter, depth)
        eval_seconds += time.perf_counter() - tick
        hooks.timed(train_seconds, eval_seconds, samples)
        value = scores[settings.metric]
        state.evaluations += 1
        state.history.append((state.evaluations, value))
        improved = record.better(value, state.best_value, direction)  # a tie keeps the earlier evaluation
        if improved:
            state.best_value, state.best_evaluation = value, state.evaluations
            state.best_metrics = scores
            state.best_model = trained_state(trainable, names, buffers)
        hooks.evaluated(state.evaluations, value, scores, improved, snapshot)
        segment = time.perf_counter()

    freeze.set_train_mode(adapter, depth)
    while step < total_steps:
        epoch, offset = divmod(step + settings.batch_start, batches_per_epoch)
        order = training_batches(lengths, hyper.batch_size, seed=batch_order_seed(settings, epoch))
        for indices, ready in _batches(data.train, order[offset:], device, settings.prefetch):
            # forward, backward, step
            _seed_step(device, settings.seed * 1_000_003 + step)  # dropout: the same on a resume
            if call is not None:
                compiled.step_begins(settings.compile_mode)
            if settings.batch_seed is not None and getattr(data.train, "augment", False) and ready is None:
                # The array's augmentation for this batch, then the trial's own dropout seed again.
                _seed_step(device, augment_seed(settings.batch_seed, settings.batch_start + step))
                batch = data.train.batch(indices, device)
                _seed_step(device, settings.seed * 1_000_003 + step)
            else:
                batch = ready if ready is not None else data.train.batch(indices, device)
            with autocast:
                logits, forward = forward_pass(adapter, batch, start, indices=indices,
                                               store=caches.prefix_train, call=call)
                task = losses.task_loss(logits, batch["labels"], hyper.label_smoothing)
                if use_pretrain:
                    forward.teacher = caches.teacher(adapter, pretrain, forward, indices)
                extra = pretrain(adapter, forward) if use_pretrain else None
                loss = task + hyper.pretrain_loss_weight * extra if extra is not None else task
            losses_seen.add(step + 1, loss, task, extra)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if hyper.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, hyper.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            samples += len(indices)
            if extra is not None:
                last_pretrain = extra.detach()

            # evaluation, preemption, progress
            evaluating = step in evaluate_at
            if evaluating or step % losses_seen.every == 0 or step >= total_steps:
                losses_seen.check()  # before a diverged model is scored or saved
            if evaluating:
                evaluation_point()
            if hooks.should_stop():
                losses_seen.check()  # a diverged model is not handed back for a retry
                hooks.stopped(snapshot())
                raise Preempted(f"stopped at step {step} of {total_steps}")
            if time.perf_counter() - last_log > settings.log_every_seconds:
                last_log = time.perf_counter()
                hooks.progress(
                    f"step {step}/{total_steps} loss {loss.item():.4f} "
                    f"{samples / max(train_seconds + last_log - segment, 1e-9):.0f} samples/s"
                )
            if step >= total_steps:
                break

    # -------------------------------------------------------------------- result
    assert state.best_value is not None and state.best_model is not None
    return LoopResult(
        best_value=state.best_value, best_evaluation=state.best_evaluation or 0,
        best_metrics=state.best_metrics, best_model=state.best_model, history=state.history,
        steps=step, train_seconds=train_seconds, eval_seconds=eval_seconds, samples=samples,
        resumed_from_step=resumed_from,
        pretrain_loss_last=float(last_pretrain) if last_pretrain is not None else None,
    )


def schedule_of(n_train: int, batch_size: int, settings: LoopSettings) -> tuple[int, int, set[int]]:
    """Batches per epoch, optimizer steps in all, and the steps after which the loop evaluates
    (the last one always), for ``n_train`` training examples in batches of ``batch_size``."""
    batches_per_epoch = math.ceil(n_train / batch_size)
    total_steps = max(1, int(round(settings.epochs * batches_per_epoch)))
    return batches_per_epoch, total_steps, _evaluation_steps(total_steps, batches_per_epoch, settings)


def batch_order_seed(settings: LoopSettings, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order (``training_batches``)."""
    seed = settings.seed if settings.batch_seed is None else settings.batch_seed
    return seed * 1_000_003 + epoch


def augment_seed(batch_seed: int, position: int) -> int:
    """The seed of the augmentation drawn for batch ``position`` of a batch order that is not
    the trial's own: a trial array draws one augmented batch for all its members, and a
    member's retry alone draws the same (``LoopSettings.batch_seed``)."""
    return (batch_seed * 1_000_003 + position) ^ 0x5EED


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (counted from 0) as a share of
    ``learning_rate``, for a trial of ``total`` steps whose first ``warmup`` steps warm up:

    1. warmup, steps 0..warmup-1: a linear rise, (step + 1) / (warmup + 1), so that the first
       step already moves the weights;
    2. decay, steps warmup..total-1: a linear fall from 1 towards 0, which it reaches at
       step ``total``, one past the last.

    transformers' ``get_linear_schedule_with_warmup`` has the same decay, but its warmup gives
    step s the share s / warmup: its first step has a learning rate of 0 and does nothing. It
    is not the same schedule, so sweeper keeps its own (a test compares the two).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def forward_pass(
    adapter: ModelAdapter, batch: dict[str, torch.Tensor], start: int, *,
    indices: np.ndarray | None = None, store: prefix.FeatureStore | None = None,
    call: BlockCall | None = None,
) -> tuple[torch.Tensor, losses.Pass]:
    """Logits, and what the pretraining terms reuse; blocks below ``start`` run without
    gradients (they are frozen, so nothing of them is needed for the backward pass).

    With a ``store`` (the frozen-prefix cache of the split ``indices`` index into), the
    frozen bottom's output is taken from it when it holds every example of the batch, and
    stored for the new examples otherwise. ``call`` runs each trainable block (the compiled
    one of ``compiled.py``); the frozen bottom always runs eagerly.
    """
    if start == 0:
        hidden, context = adapter.embed(batch)
    elif store is not None and indices is not None and store.has(indices):
        hidden = store.gather(indices)
        context = adapter.context(batch, hidden)
    else:
        with torch.no_grad():
            hidden, context = adapter.embed(batch)
            hidden = adapter.run(hidden, context, adapter.blocks[:start])
        if store is not None and indices is not None:
            store.store(indices, hidden)
    top = adapter.run(hidden, context, adapter.blocks[start:], call)
    return adapter.head(top, context), losses.Pass(batch, hidden, top, context)


@torch.no_grad()
def evaluate(
    adapter: ModelAdapter, split: Any, device: torch.device, bf16: bool, num_labels: int,
    batch_size: int = 64, *, start: int = 0, store: prefix.FeatureStore | None = None,
) -> dict[str, float]:
    """All metrics of ``adapter`` on ``split``, in evaluation mode. With a ``store``, the
    blocks below ``start`` (frozen, so the same at every evaluation) come from the cache."""
    adapter.eval()
    predictions, labels = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with attention_kernels(), _autocast(device, bf16):
        for indices in evaluation_batches(split.lengths(), max(batch_size, 64)):
            batch = split.batch(indices, device)
            if store is not None and start > 0:
                logits = forward_pass(adapter, batch, start, indices=indices, store=store)[0]
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            else:
                logits = adapter(batch)
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").double()
            predictions.append(logits.argmax(-1))
            labels.append(batch["labels"])
    if not labels:
        raise SweepError("the validation split is empty: raise `data.validation_fraction`")
    # One transfer at the end: the device never waits on the host between batches.
    gold = torch.cat(labels).cpu().numpy()
    return metrics.compute(torch.cat(predictions).cpu().numpy(), gold, float(loss_sum) / len(gold), num_labels)


class _Caches:
    """The feature stores one trial uses (``prefix.py``), or None where nothing may be cached."""

    def __init__(self, adapter: ModelAdapter, data: PreparedData, start: int, settings: LoopSettings,
                 pretrain: losses.PretrainLoss | None) -> None:
        self.prefix_train: prefix.FeatureStore | None = None
        self.prefix_validation: prefix.FeatureStore | None = None
        self.teacher_train: prefix.FeatureStore | None = None
        if not settings.cache_prefix:
            return
        dtype = prefix.storage_dtype(settings.prefix_cache_dtype, _autocast_dtype(settings.device, settings.bf16))
        device, budget = settings.device, settings.prefix_cache_gib
        tokens = adapter.kind == "text"
        frozen = [adapter.stem, *adapter.blocks[:start]]
        if start > 0:  # at full depth nothing is frozen: the prefix cache is bypassed
            digest = prefix.weights_digest(frozen)
            if not getattr(data.train, "augment", False):  # augmented inputs change every epoch
                self.prefix_train = prefix.open_store("prefix", digest, data.train, tokens=tokens, dtype=dtype,
                                                      device=device, budget_gib=budget)
            self.prefix_validation = prefix.open_store("prefix", digest, data.validation, tokens=tokens,
                                                       dtype=dtype, device=device, budget_gib=budget)
        if isinstance(pretrain, losses.Distill) and not getattr(data.train, "augment", False):
            # The teacher is the whole pretrained encoder, whatever the depth: its pooled
            # features are kept in fp32 (one small row per example).
            teacher = [pretrain.teacher_stem] if pretrain.teacher_stem is not None else frozen
            digest = prefix.weights_digest([*teacher, *pretrain.teacher_blocks])
            self.teacher_train = prefix.open_store("teacher", digest, data.train, tokens=False,
                                                   dtype=torch.float32, device=device, budget_gib=budget)

    def teacher(self, adapter: ModelAdapter, pretrain: losses.PretrainLoss, forward: losses.Pass,
                indices: np.ndarray) -> torch.Tensor | None:
        """The ``distill`` teacher's features of the batch, from the store or computed (and
        stored); None for the other pretraining terms."""
        if self.teacher_train is None or not isinstance(pretrain, losses.Distill):
            return None
        if self.teacher_train.has(indices):
            return self.teacher_train.gather(indices)
        features = pretrain.teacher_features(adapter, forward)
        self.teacher_train.store(indices, features)
        return features


class _LossWatch:
    """Notices a non-finite loss without making every step wait for the device.

    The losses of the last few steps are kept on the device and checked together: one
    synchronisation every ``every`` steps instead of one per step. A diverged trial therefore
    runs at most ``every - 1`` steps past the step that diverged, which it reports.
    """

    def __init__(self, hyper: Hyper, every: int) -> None:
        self.hyper, self.every = hyper, every
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def add(self, step: int, loss: torch.Tensor, task: torch.Tensor, extra: torch.Tensor | None) -> None:
        self.pending.append((step, loss.detach(), task.detach(), None if extra is None else extra.detach()))

    def check(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        finite = torch.isfinite(torch.stack([loss.float() for _, loss, _, _ in pending])).cpu()
        if bool(finite.all()):
            return
        step, loss, task, extra = pending[int((~finite).nonzero()[0])]
        raise NonFiniteLoss(
            f"the loss became {loss.item()} at step {step} (task loss {task.item():.4g}"
            + (f", pretrain loss {extra.item():.4g}" if extra is not None else "")
            + f") with learning_rate {self.hyper.learning_rate:.3g}: the trial diverged; "
            "narrow `space.learning_rate` if many trials do this"
        )


def _batches(
    split: Any, order: list[np.ndarray], device: torch.device, prefetch: bool
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor] | None]]:
    """``(indices, batch)`` in ``order``. With ``prefetch``, the next batch is padded and sent
    on a thread while the caller runs the current step: the device never waits on the host.
    Otherwise ``batch`` is None and the caller builds it after seeding the step: splits that
    draw random numbers per batch (augmented images) never prefetch, so that the per-step
    seed still decides them, on a resume too."""
    if not prefetch or getattr(split, "augment", False) or len(order) < 2:
        for indices in order:
            yield indices, None
        return
    def load(indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = split.batch(indices, torch.device("cpu"))
        if device.type != "cuda":
            return {k: v.to(device) for k, v in batch.items()}
        # Pinned pages: the copy runs asynchronously, behind the kernels already queued.
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweeper-batches") as pool:
        upcoming = pool.submit(load, order[0])
        for k, indices in enumerate(order):
            batch = upcoming.result()
            if k + 1 < len(order):
                upcoming = pool.submit(load, order[k + 1])
            yield indices, batch


def _evaluation_steps(total: int, per_epoch: int, settings: LoopSettings) -> set[int]:
    if settings.eval_every_steps:
        steps = set(range(settings.eval_every_steps, total + 1, settings.eval_every_steps))
    else:
        every = per_epoch / max(1, settings.evals_per_epoch)
        steps = {max(1, int(round(every * k))) for k in range(1, int(total / every + 1e-9) + 1)}
    steps = {s for s in steps if s <= total}
    steps.add(total)  # the end of training is always evaluated
    return steps


def _optimizer(adapter: ModelAdapter, trainable: list[torch.nn.Parameter], hyper: Hyper) -> torch.optim.Optimizer:
    # Decay weight matrices only: biases and norm gains are not regularised (BERT's recipe).
    decay = [p for p in trainable if p.ndim >= 2]
    keep = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": hyper.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    # One fused kernel for every parameter, on a GPU and on a CPU: on a CPU the per-tensor
    # loop it replaces held MiniLM-L6 to 46 samples/s against 56 fused (bench/README.md).
    fused = bool(trainable) and trainable[0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=hyper.learning_rate, betas=(0.9, hyper.adam_beta2),
        eps=1e-8, fused=fused or None,
    )


def load_trained(adapter: ModelAdapter, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` (a best model, or a resume state's model: trainable parameters and trained
    buffers, by the model's names) into ``adapter``."""
    targets = {**dict(adapter.model.named_buffers()), **dict(adapter.named_parameters())}
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


def trained_state(trainable: list[torch.nn.Parameter], names: dict[int, str],
                  buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy on the CPU of what training changed: the trainable parameters and buffers."""
    state = {names[id(p)]: p.detach().cpu().clone() for p in trainable}
    state.update({name: b.detach().cpu().clone() for name, b in buffers.items()})
    return state


def _autocast_dtype(device: torch.device, bf16: bool) -> torch.dtype | None:
    if device.type == "cuda" and bf16 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, bf16: bool) -> Any:
    if _autocast_dtype(device, bf16) is not None:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def attention_kernels() -> contextlib.AbstractContextManager[Any]:
    """Scaled-dot-product attention by any kernel but cuDNN's, for as long as it is open.

    cuDNN's attention builds an execution plan for every new input shape, at a cost of
    milliseconds to seconds of host time, and length-bucketed batches bring a new shape with
    almost every batch. On an H100 (torch 2.11, MiniLM-L6, batch 32) it held sweeper's loop to
    191 samples/s, 17 of its 21 host seconds in cuDNN's attention; without it, 964
    (bench/README.md). Flash, memory-efficient and math kernels need no plan. On a CPU, where
    cuDNN never runs, nothing changes.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _seed_step(device: torch.device, seed: int) -> None:
    """``torch.manual_seed`` for the generators a step draws from: the CPU's and the trial
    device's. ``torch.manual_seed`` also walks every other device type (CUDA's every GPU,
    MPS, XPU, MTIA), about 0.3 ms of host time a call on this project's CPU machine: once
    a step, a few per cent of a host-bound GPU step."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":  # the model is on the device by now, so CUDA is initialised
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
