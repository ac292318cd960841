"""One trial: from an Optuna trial to a fine-tuning run and back.

The objective samples the space, builds the model with the pretrained weights, trains it
(continuing from the resume state of the trial it replaces, if it is a retry), reports every
evaluation to Optuna (which may prune it), saves the checkpoint of its best evaluation, and
records what the dashboard, ``sweeper status`` and the report need: the fields of
``sweeper/record.py`` whose writer is ``objective`` (listed in docs/records.md).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from sweeper import __version__, checkpoints, configuration, head_probe, pbt, promotion, record
from sweeper import space as space_mod
from sweeper.errors import SweepError
from sweeper.finetune import freeze
from sweeper.finetune.data import PreparedData, prepare
from sweeper.finetune.loop import (
    Hooks,
    Hyper,
    LoopResult,
    LoopSettings,
    NonFiniteLoss,
    Preempted,
    TrainState,
    load_trained,
    schedule_of,
    train,
)
from sweeper.outcome import Outcome, WorkerInfo
from sweeper.study import Sweep

logger = logging.getLogger(__name__)


def prepare_data(sweep: Sweep) -> tuple[PreparedData, Any]:
    """The study's splits (tokenised once per machine, then read from the cache) and the
    tokenizer they were made with."""
    tokenizer = sweep.model.tokenizer(sweep.cache_dir)
    return prepare(sweep.data, sweep.cache_dir, sweep.seed, tokenizer, sweep.model.identity()), tokenizer


def trial_seed(study_seed: int, trial_number: int) -> int:
    """The seed of a trial, from the first trial of its retry lineage (a retry reuses it)."""
    digest = hashlib.sha256(f"{study_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def head_seed(study_seed: int) -> int:
    """The seed of the new head's initial weights under ``head_init="shared"``: one per study,
    so every trial's head starts from the same draw and the trials can be averaged (issue 19)."""
    digest = hashlib.sha256(f"{study_seed}:head".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def lineage(trial: optuna.Trial | FrozenTrial) -> list[int]:
    """Numbers of the trials this one retries, oldest first (empty for a first attempt)."""
    return [int(n) for n in record.RETRY_HISTORY.get(trial, [])]


class Objective:
    """Runs trials of one sweep in one worker process (keeps data and weights in memory)."""

    def __init__(self, sweep: Sweep, study: optuna.Study, worker: WorkerInfo, store: Any,
                 stop: threading.Event | None = None) -> None:
        self.sweep = sweep
        self.study = study
        self.worker = worker
        self.store = store
        self.stop = stop or threading.Event()
        self.device = torch.device(worker.device)
        self._data: PreparedData | None = None
        self._tokenizer: Any = None
        self.head_probe = head_probe.StudyProbe(study, store, sweep.seed)  # head_init="probe": read once
        self.timings: dict[record.Field[float], float] = {}  # the running trial's, as of its last evaluation point

    # ------------------------------------------------------------------ shared state

    def data(self) -> PreparedData:
        if self._data is None:
            self._data, self._tokenizer = prepare_data(self.sweep)
        return self._data

    # ------------------------------------------------------------------ one trial

    def run(self, trial: optuna.Trial) -> Outcome:
        started = time.time()
        self.timings = {}
        try:
            self.mark_device(trial, devices=1)  # inside: a reaper may have failed it already
            value = self._train(trial) if self.sweep.train is None else self._train_user(trial)
        except Exception as exc:
            return self.ended(trial, exc, lambda reason: self._finish(trial, started, reason=reason))
        self._finish(trial, started, ended_early=False)
        return Outcome(optuna.trial.TrialState.COMPLETE, value=value)

    def mark_device(self, trial: optuna.Trial, devices: float) -> None:
        """Who trains ``trial`` and on what share of a device (a member of an array of K: 1/K)."""
        record.WORKER.set(trial, self.worker.index)
        record.DEVICE.set(trial, self.worker.device if self.worker.physical_gpu is None
                          else f"cuda (GPU {self.worker.physical_gpu})")
        record.DEVICES.set(trial, devices)

    def ended(self, trial: optuna.Trial, exc: BaseException, finish: Callable[[str | None], None]) -> Outcome:
        """How a trial that raised ``exc`` ended; ``finish(reason)`` records it and tidies up
        (not for a preempted trial, whose resume state its retry needs)."""
        if isinstance(exc, optuna.TrialPruned):
            finish(None)
            return Outcome(optuna.trial.TrialState.PRUNED, reason=str(exc) or None)
        if isinstance(exc, Preempted):
            return Outcome(optuna.trial.TrialState.FAIL, reason=f"preempted: {exc}", preempted=True)
        if isinstance(exc, promotion.Paused):  # waits for a promotion: its resume state stays
            return Outcome(optuna.trial.TrialState.WAITING, reason=str(exc))
        if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
            # Another process failed this trial (its heartbeat looked stale, e.g. while the
            # database was down longer than the grace period) and queued its retry: stop here.
            logger.warning("trial %d was failed by another process; dropping it", trial.number)
            return Outcome(optuna.trial.TrialState.FAIL, reason="failed by another process (stale heartbeat)")
        if not isinstance(exc, (SweepError, torch.cuda.OutOfMemoryError, MemoryError)):
            # A bug or an unexpected library error: fail this trial only.
            logger.error("trial %d raised", trial.number, exc_info=exc)
        reason = _one_line(exc, trial)
        finish(reason)
        return Outcome(optuna.trial.TrialState.FAIL, reason=reason)

    def _finish(self, trial: optuna.Trial, started: float, reason: str | None = None,
                ended_early: bool = True, timings: dict[record.Field[float], float] | None = None,
                device_seconds: float | None = None) -> None:
        """Record how ``trial`` ended and tidy up. ``device_seconds``: its share of the device
        (a member of an array), else the time since ``started``; ``timings``: its last
        evaluation point's, else the running trial's (``self.timings``)."""
        spent = time.time() - started if device_seconds is None else device_seconds
        spent += float(record.GPU_SECONDS.get(trial, 0.0))  # a promoted trial's runs before its pauses
        record.GPU_SECONDS.set(trial, round(spent, 3))
        if ended_early:  # pruned or failed: the timings as of its last evaluation point
            for field, value in (self.timings if timings is None else timings).items():
                field.set(trial, value)
        if reason:
            record.FAIL_REASON.set(trial, reason)
        if self.sweep.scheduler == "pbt":  # other segments may start from its state: pbt.py decides
            pbt.release(self.study, self.store, trial)
        else:
            checkpoints.remove_resume(self.store, trial)
            for earlier in self._lineage_trials(trial):  # the states this retry continued from
                checkpoints.remove_resume(self.store, earlier)
        # Keep-top-k as the sweep runs, not only at its end, so a long sweep cannot fill the
        # disk. This trial is ranked by the next clean-up, once it is told COMPLETE.
        checkpoints.tidy(self.study, self.store, self.sweep.keep)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _train(self, trial: optuna.Trial) -> float:
        """Train ``trial`` and record its results; returns its value (its best evaluation)."""
        prepared = self.prepare(trial)
        segment, resume = prepared.hooks.segment, prepared.resume
        if segment is not None and resume is not None and resume.history and \
                pbt.ends_at(resume.evaluations, segment, self.sweep.perturbation_interval, prepared.hooks.evaluations):
            # The attempt this retries reached the segment's end and was cut off before it was
            # told: end it there, from that state (kept as this trial's own, for a donor).
            checkpoints.save_resume(self.store, trial, resume)
            ended = prepared.hooks.end_segment(resume, {self.sweep.metric: resume.history[-1][1]})
            return self.conclude(trial, prepared, ended.result)
        try:
            result = train(prepared.adapter, self.data(), prepared.hyper, prepared.settings, prepared.hooks,
                           prepared.resume, lm_head=prepared.lm_head, tokenizer=self._tokenizer)
        except pbt.SegmentEnded as ended:  # scheduler="pbt": the segment's last evaluation is its result
            result = ended.result
        return self.conclude(trial, prepared, result)

    def prepare(self, trial: optuna.Trial, place: dict[str, int] | None = None) -> PreparedTrial:
        """Everything ``trial`` trains with: its sampled values, seed, model (the new head drawn
        as its ``head_init`` says), settings, hooks and the resume state it continues from.
        ``place``: where it sits in a trial array ({batch_seed, batch_start}); a retry of a
        member finds its lineage's, so it sees the same batches alone."""
        sweep = self.sweep
        params = space_mod.sample(sweep.space, trial)
        hyper = Hyper(**params)
        data = self.data()
        history = lineage(trial)
        repeat = self._repeat_mark(trial, history)  # a seed trial of `sweeper best --seeds` trains with its own seed
        # A seed trial of a PBT sweep trains its segment's values for a whole run: it is no segment.
        segment = pbt.begin(trial, history) if sweep.scheduler == "pbt" and repeat is None else None
        # A PBT segment trains with its member's seed, so a member that always continues trains as one trial.
        first = int(segment["member"]) if segment else (history[0] if history else trial.number)
        seed = int(repeat["seed"]) if repeat else trial_seed(sweep.seed, first)
        # The new head's initial weights: the study's draw, or the trial's (`head_init`; "probe" fits over them).
        torch.manual_seed(head_seed(sweep.seed) if sweep.head_init == "shared" else seed)
        adapter = sweep.model.build(data.num_labels, sweep.cache_dir, hyper.dropout, data.label_names)
        if sweep.head_init == "probe":  # the study's linear probe of the pretrained features (head_probe.py)
            self.head_probe.initialise(adapter, data.train, data.num_labels, self.device)
        depth = adapter.num_blocks if hyper.unfreeze_depth is None else hyper.unfreeze_depth
        freeze.check_depth(depth, adapter.num_blocks)
        problems = hyper.check(adapter.num_blocks)
        if problems:
            raise SweepError("; ".join(problems))
        record.SEED.set(trial, seed)  # the rest of the configuration is the study's, recorded once
        if history:
            record.LINEAGE.set(trial, history)
        place = place or self._array_place(trial)
        # A promoted trial continues from its own resume state (promotion.py), a retry from its lineage's.
        resume = self._resume_state(history + ([trial.number] if promotion.was_paused(trial) else []))
        if resume is None and segment and segment.get("parent") is not None:
            resume = self._segment_start(int(segment["parent"]), segment)  # a PBT segment: its parent's state
        if resume is not None:
            record.RESUMED_FROM_STEP.set(trial, resume.step)
        # Only text models have an MLM head; the study check refuses mlm for any other.
        lm_head = (sweep.model.pretrained_lm_head(sweep.cache_dir)  # type: ignore[union-attr]
                   if sweep.pretrain_loss == "mlm" else None)
        settings = LoopSettings(
            epochs=sweep.epochs, metric=sweep.metric, direction=sweep.direction, device=self.device,
            seed=seed, pretrain_loss=sweep.pretrain_loss, evals_per_epoch=sweep.evals_per_epoch,
            eval_every_steps=sweep.eval_every_steps, bf16=sweep.bf16, compile=sweep.compile,
            batch_seed=place["batch_seed"] if place else None, batch_start=place["batch_start"] if place else 0,
        )
        # A seed trial is not pruned: its figure is one sample of a spread, wanted whole; nor is a PBT segment.
        hooks = _TrialHooks(self, trial, sweep.max_evaluations, prune=repeat is None and segment is None)
        if segment is not None:
            hooks.segment = segment
            hooks.evaluations = len(schedule_of(len(data.train), hyper.batch_size, settings)[2])
        if resume is not None:
            hooks.replay(resume)
        return PreparedTrial(params, hyper, adapter, seed, settings, hooks, resume, lm_head)

    def conclude(self, trial: optuna.Trial, prepared: PreparedTrial, result: LoopResult) -> float:
        """Save the checkpoint of ``trial``'s best evaluation and record its results; returns its value."""
        sweep, adapter, data = self.sweep, prepared.adapter, self.data()
        load_trained(adapter, result.best_model)
        meta = {
            "trial": trial.number, "params": prepared.params, "value": result.best_value,
            "metric": sweep.metric, "direction": sweep.direction,
            "best_evaluation": result.best_evaluation,
            "validation": result.best_metrics, "study": configuration.of(sweep), "sweeper": __version__,
            "hyperparameters": vars(prepared.hyper), "blocks": adapter.num_blocks, "seed": prepared.seed,
            "model_kind": adapter.kind, "num_labels": data.num_labels, "label_names": data.label_names,
        }
        # A full or unwritable store raises a StoreError that says so: it fails this trial only.
        info = checkpoints.save_model(self.store, trial, adapter, self._tokenizer, meta)
        info.update(evaluation=result.best_evaluation, value=result.best_value)
        for name, value in result.best_metrics.items():
            record.VALIDATION.set(trial, name, value)
        record.BEST_EVALUATION.set(trial, result.best_evaluation)
        record.TRAIN_SECONDS.set(trial, round(result.train_seconds, 3))  # the timings of the whole trial
        record.EVAL_SECONDS.set(trial, round(result.eval_seconds, 3))
        record.SAMPLES_PER_SECOND.set(trial, round(result.samples_per_second, 1))
        record.STEPS.set(trial, result.steps)
        record.CHECKPOINT.set(trial, info)
        logger.info("trial %d finished: %s %.4f at evaluation %d (%.0f samples/s)", trial.number,
                    sweep.metric, result.best_value, result.best_evaluation, result.samples_per_second)
        return result.best_value

    def _array_place(self, trial: optuna.Trial) -> dict[str, int] | None:
        """The array place of the first trial of ``trial``'s lineage, copied onto ``trial``
        (its own retry then finds it too), or None."""
        place = record.ARRAY.get(trial)
        if place or not lineage(trial):
            return place
        first = [t for t in self._lineage_trials(trial) if t.number == lineage(trial)[0]]
        place = record.ARRAY.get(first[0]) if first else None
        if place:
            record.ARRAY.set(trial, place)
        return place

    def _repeat_mark(self, trial: optuna.Trial, history: list[int]) -> dict[str, Any] | None:
        """The seed-trial mark of ``trial``; a retry (which starts with no user attributes)
        takes its lineage's, so it trains with the same seed and stays out of the ranking."""
        mark = record.REPEAT.get(trial)
        if mark or not history:
            return mark
        first = [t for t in self._lineage_trials(trial) if t.number == history[0]]
        mark = record.REPEAT.get(first[0]) if first else None
        if mark:
            record.REPEAT.set(trial, mark)
        return mark

    def _train_user(self, trial: optuna.Trial) -> float:
        """Run the study's own ``train`` function for ``trial`` (issue 20): sweeper samples,
        seeds, keeps the resume state and the checkpoint; the function trains."""
        from sweeper import user_train

        sweep = self.sweep
        assert sweep.train is not None  # run() dispatches here only then
        params = space_mod.sample(sweep.space, trial)
        history = lineage(trial)
        seed = trial_seed(sweep.seed, history[0] if history else trial.number)
        record.SEED.set(trial, seed)
        if history:
            record.LINEAGE.set(trial, history)
        context = user_train.TrialContext(trial, self.study, self.store, record.direction_of(sweep.direction),
                                          sweep.metric, self.stop, history, sweep=sweep)
        meta = {"trial": trial.number, "params": params, "metric": sweep.metric, "direction": sweep.direction,
                "study": configuration.of(sweep), "sweeper": __version__, "seed": seed, "model_kind": "user"}
        return user_train.run(sweep.train, trial, params, context, self.device, seed, meta)

    def _lineage_trials(self, trial: optuna.Trial) -> list[FrozenTrial]:
        history = set(lineage(trial))
        if not history:
            return []
        return [t for t in self.study.get_trials(deepcopy=False) if t.number in history]

    def _segment_start(self, parent: int, segment: dict[str, Any]) -> TrainState:
        """The resume state a PBT segment starts from: its parent's, at the parent's end."""
        earlier = next((t for t in self.study.get_trials(deepcopy=False) if t.number == parent), None)
        info = record.RESUME.get(earlier) if earlier is not None else None
        try:
            if not info:
                raise LookupError("no resume state recorded")
            state = checkpoints.load_resume(self.store, info["id"])
        except Exception as exc:  # noqa: BLE001  (gone or unreadable: this member cannot go on)
            raise SweepError(f"the resume state of trial {parent}, where this segment of member "
                             f"{segment['member']} starts, cannot be read ({exc}): the member ends here") from None
        logger.info("PBT segment %d of member %s starts from trial %d at step %d (%s)", segment["generation"],
                    segment["member"], parent, state.step, segment["decision"])
        return state

    def _resume_state(self, history: list[int]) -> TrainState | None:
        """The resume state of the latest trial in this retry's lineage that saved one."""
        if not history:
            return None
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number in reversed(history):
            earlier = by_number.get(number)
            info = record.RESUME.get(earlier) if earlier else None
            if info:
                try:
                    state = checkpoints.load_resume(self.store, info["id"])
                except Exception as exc:
                    logger.warning("resume state of trial %d unreadable (%s); starting over", number, exc)
                    return None
                logger.info("trial continues trial %d from step %d", number, state.step)
                return state
        return None


@dataclass
class PreparedTrial:
    """What one trial trains with (``Objective.prepare``)."""

    params: dict[str, Any]
    hyper: Hyper
    adapter: Any
    seed: int
    settings: LoopSettings
    hooks: _TrialHooks
    resume: TrainState | None
    lm_head: Any


class _TrialHooks(Hooks):
    """Reports to Optuna, prunes, keeps the resume state, and stops on preemption."""

    def __init__(self, objective: Objective, trial: optuna.Trial, planned: int, prune: bool = True) -> None:
        self.objective, self.trial, self.planned, self.prune = objective, trial, planned, prune
        self.timings: dict[record.Field[float], float] = {}  # as of its last evaluation point
        self.segment: dict[str, Any] | None = None  # scheduler="pbt": the segment this trial trains
        self.evaluations = 0  # ... and the evaluations of its whole run
        self.samples = 0  # trained since it started or resumed, as of its last evaluation point

    def replay(self, state: TrainState) -> None:
        """Report the evaluations of the trial being continued, so its curve is complete."""
        if promotion.was_paused(self.trial):
            return  # a promoted trial continues its own curve: it has these already
        for evaluation, value in state.history:
            self.trial.report(value, evaluation)

    def evaluated(self, evaluation: int, value: float, all_metrics: dict[str, float], improved: bool,
                  snapshot: Any) -> None:
        trial = self.trial
        trial.report(value, evaluation)
        record.PROGRESS.set(trial, {"evaluation": evaluation, "of": self.planned, "value": value})
        logger.info("trial %d evaluation %d: %.4f", trial.number, evaluation, value)
        if self.prune and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at evaluation {evaluation} with {value:.4f}")
        sweep = self.objective.sweep
        ends = self.segment is not None and pbt.ends_at(evaluation, self.segment, sweep.perturbation_interval,
                                                        self.evaluations)
        state = snapshot()
        try:
            checkpoints.save_resume(self.objective.store, trial, state)
        except checkpoints.StoreError as exc:  # a full disk must not kill the trial; it just loses its resume point
            if ends:
                raise  # but a PBT segment's end hands its state on: without it its member cannot go on
            logger.warning("trial %d: cannot save its resume state (%s)", trial.number, exc)
            return  # nor does it pause at a rung without one: it could not be promoted
        if self.prune and sweep.pruner == "asha":  # may pause it here (raises promotion.Paused)
            promotion.judge(self.objective.study, trial, evaluation, value, eta=sweep.reduction_factor,
                            max_evaluations=sweep.max_evaluations)
        if ends:
            raise self.end_segment(state, all_metrics)

    def end_segment(self, state: TrainState, metrics: dict[str, float]) -> pbt.SegmentEnded:
        """End this PBT segment at ``state`` (saved): queue its member's next segment, and the
        result to end the trial with, this evaluation's model and value."""
        evaluation, value = state.history[-1]
        pbt.end_segment(self.objective.study, self.trial, self.objective.sweep, evaluation=evaluation, value=value,
                        step=state.step, planned=self.evaluations)
        return pbt.SegmentEnded(LoopResult(
            best_value=value, best_evaluation=evaluation, best_metrics=dict(metrics), best_model=state.model,
            history=list(state.history), steps=state.step, train_seconds=self.timings.get(record.TRAIN_SECONDS, 0.0),
            eval_seconds=self.timings.get(record.EVAL_SECONDS, 0.0), samples=self.samples))

    def timed(self, train_seconds: float, eval_seconds: float, samples: int) -> None:
        self.samples = samples
        self.timings = self.objective.timings = {
            record.TRAIN_SECONDS: round(train_seconds, 3), record.EVAL_SECONDS: round(eval_seconds, 3),
            record.SAMPLES_PER_SECOND: round(samples / train_seconds, 1) if train_seconds > 0 else 0.0,
        }

    def should_stop(self) -> bool:
        return self.objective.stop.is_set()

    def stopped(self, state: TrainState) -> None:
        try:
            checkpoints.save_resume(self.objective.store, self.trial, state)
        except checkpoints.StoreError as exc:  # still hand it back: the retry starts earlier
            logger.warning("trial %d: cannot save its resume state (%s)", self.trial.number, exc)


def _one_line(exc: BaseException, trial: optuna.Trial) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        batch = trial.params.get("batch_size")
        return ("CUDA out of memory" + (f" at batch_size {batch}" if batch else "")
                + ": lower batch_size or --workers-per-gpu")
    # PyTorch's CPU allocator raises a RuntimeError, not MemoryError, when malloc fails.
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
        return "out of host memory: lower batch_size or the number of workers"
    if isinstance(exc, (SweepError, NonFiniteLoss)):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
