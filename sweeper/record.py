"""What sweeper records on a trial and on a study, defined once: key, type, writer, readers.

Optuna keeps a trial's and a study's extra data as JSON attributes under string keys. Every
key sweeper writes or reads is a :class:`Field` here, and every module reads and writes
through it, so that a key cannot be misspelt in one place, and the list below (also written
out in ``docs/records.md``, checked by a test) is the whole of it. How trials are ranked is
defined here too, once, with Optuna's :class:`~optuna.study.StudyDirection`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from sweeper import optuna_adapter

T = TypeVar("T")

Scope = Literal["trial user", "trial system", "study user", "study system"]
Holder = optuna.Trial | FrozenTrial | optuna.Study


@dataclass(frozen=True)
class Field(Generic[T]):
    """One attribute: ``key`` in the ``scope`` attributes, holding a ``kind`` value."""

    key: str
    scope: Scope
    kind: str  # the JSON value, as a reader should expect it
    writer: str  # the module that writes it
    readers: tuple[str, ...]  # the modules that read it
    meaning: str

    def get(self, holder: Holder, default: Any = None) -> Any:
        """The value on ``holder`` (a trial or a study), or ``default`` when it has none."""
        return _attributes(holder, self.scope).get(self.key, default)

    def set(self, holder: Holder, value: T) -> None:
        if self.scope in ("trial user", "study user"):
            holder.set_user_attr(self.key, value)
        elif self.scope == "study system" and isinstance(holder, optuna.Study):
            optuna_adapter.set_study_system_attr(holder, self.key, value)
        elif self.scope == "trial system" and isinstance(holder, optuna.Trial):
            optuna_adapter.set_trial_system_attr(holder, self.key, value)
        else:  # a finished trial's attributes are no longer written
            raise TypeError(f"{self.key} is written on a running trial or its study, not on {type(holder).__name__}")


@dataclass(frozen=True)
class Family(Generic[T]):
    """Attributes that share a prefix: ``<prefix><name>``, one per metric or per trial."""

    prefix: str
    scope: Scope
    kind: str
    writer: str
    readers: tuple[str, ...]
    meaning: str

    def key(self, name: object) -> str:
        return f"{self.prefix}{name}"

    def get(self, holder: Holder, name: object, default: Any = None) -> Any:
        return _attributes(holder, self.scope).get(self.key(name), default)

    def set(self, holder: Holder, name: object, value: T) -> None:
        holder.set_user_attr(self.key(name), value)

    def items(self, holder: Holder) -> dict[str, Any]:
        """Every member on ``holder``, by the name after the prefix."""
        return {key[len(self.prefix):]: value for key, value in _attributes(holder, self.scope).items()
                if key.startswith(self.prefix)}


def _attributes(holder: Holder, scope: Scope) -> dict[str, Any]:
    if scope == "trial user" or scope == "study user":
        return holder.user_attrs
    if scope == "trial system":
        return optuna_adapter.trial_system_attrs(holder)  # type: ignore[arg-type]
    return optuna_adapter.study_system_attrs(holder)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a trial

WORKER = Field[int]("worker", "trial user", "int", "objective", ("status", "report"),
                    "index of the worker slot that ran it")
HOST = Field[str]("host", "trial user", "str", "liveness", ("liveness", "status", "report"),
                  "the machine that runs it (owner check)")
PID = Field[int]("sweeper:pid", "trial system", "int", "liveness", ("liveness",),
                 "the worker process that runs it (owner check)")
HEARTBEAT_AT = Field[float]("sweeper:heartbeat_at", "trial system", "float (epoch s)", "liveness", ("liveness",),
                            "last beat, where the storage has no heartbeat of Optuna's (the gRPC proxy)")
DEVICE = Field[str]("device", "trial user", "str", "objective", ("status", "report"), "cpu, cuda:0, or cuda (GPU n)")
DEVICES = Field[float]("devices", "trial user", "float", "objective", ("budget", "promotion"),
                       "devices it holds, for the device-hours it spends (a member of an array of K: 1/K)")
SEED = Field[int]("seed", "trial user", "int", "objective", (),
                  "the trial's seed: batch order, dropout (the study's configuration is on the study, once)")
PROGRESS = Field[dict[str, Any]]("progress", "trial user", "{evaluation, of, value}", "objective, user_train",
                                 ("status", "report"), "where a running trial is")
VALIDATION = Family[float]("val_", "trial user", "float", "objective, user_train", ("best", "report"),
                           "every validation metric at the best evaluation (val_accuracy, ...)")
BEST_EVALUATION = Field[int]("best_evaluation", "trial user", "int", "objective, user_train, promotion",
                             ("status", "best"),
                             "the evaluation that the value and the checkpoint come from")
TRAIN_SECONDS = Field[float]("train_seconds", "trial user", "float (s)", "objective", ("report",), "time in training steps")
EVAL_SECONDS = Field[float]("eval_seconds", "trial user", "float (s)", "objective", ("report",), "time in evaluations")
SAMPLES_PER_SECOND = Field[float]("samples_per_second", "trial user", "float", "objective", ("report",),
                                  "training throughput")
STEPS = Field[int]("steps", "trial user", "int", "objective", (), "optimizer steps taken")
GPU_SECONDS = Field[float]("gpu_seconds", "trial user", "float (s)", "objective, promotion", ("budget", "report"),
                           "device-seconds it used (elapsed time x devices; a paused trial's so far, summed over "
                           "its runs once promoted)")
RESUMED_FROM_STEP = Field[int]("resumed_from_step", "trial user", "int", "objective, user_train", (),
                               "for a retry: the step it continued from")
ARRAY = Field[dict[str, int]]("array", "trial user", "{first, batch_seed, batch_start, size}", "array_worker",
                              ("objective", "array_worker"),
                              "for a member of a trial array: the array's first trial, the batch order it saw "
                              "from which position (a retry alone sees the same), members at its start")
LINEAGE = Field[list[int]]("lineage", "trial user", "list[int]", "objective", (),
                           "for a retry: the trials before it, oldest first")
FAIL_REASON = Field[str]("fail_reason", "trial user", "str", "objective, worker, liveness", ("status", "report", "launcher"),
                         "one line, for a failed trial")
CHECKPOINT = Field[dict[str, Any]]("sweeper:checkpoint", "trial system",
                                   "{files: {name: {id, sha256, bytes}}, evaluation, value}",
                                   "objective, user_train", ("checkpoints", "status", "report", "best"),
                                   "the model checkpoint's artifacts (for machines: not in the dashboard's list)")
RESUME = Field[dict[str, Any] | None]("sweeper:resume", "trial system", "{id, step[, sha256]} or None",
                                      "checkpoints, user_train", ("checkpoints", "objective", "pbt"), "the resume state; None once the trial ended")
REPEAT = Field[dict[str, Any]]("repeats", "trial user", "{trial, seed, index}", "best (enqueue_trial), objective",
                               ("objective", "best", "array_structure"),
                               "a seed trial (`sweeper best --seeds`): the trial it repeats and the seed it trains with; "
                               "the objective copies it onto a retry. Never ranked")
PROMOTION = Field[list[dict[str, Any]]](
    "sweeper:promotion", "trial system", "list[{decision, rung, evaluation, value, eta, rank?, of?, resumed?, at}]", "promotion",
    ("promotion", "budget"),
    "pruner=\"asha\": every rung decision, oldest first: promote (went on at once, or was resumed), pause "
    "(waiting again, with its resume state), prune (still paused when the sweep ended); status and report show "
    "them (for machines: several lines a trial)")
PBT = Field[dict[str, Any]](
    "sweeper:pbt", "trial system",
    "{member, generation, parent, previous, start_step, start_evaluation, decision, rank?, of?, value?, explore?, "
    "end?: {evaluation, value, step, evaluations}}", "pbt", ("worker", "lineage"),
    "scheduler=\"pbt\": the segment of a member this trial is: the trial whose resume state it started from "
    "(parent; the member's own previous segment, or the top member it exploited), at which step and evaluation, "
    "and why (start, continue, exploit with its rank, and explore: each hyperparameter's from, to and factor or "
    "resample); `end` once it ended. The chain of parents is the schedule of a model; a retry keeps it")

RETRY_HISTORY = Field[list[int]]("retry_history", "trial system", "list[int]", "worker (RetryCallback)",
                                 ("budget", "objective", "worker", "array_structure", "pbt", "lineage"),
                                 "the trials a retry replaces, oldest first (Optuna's own key)")
FAILED_TRIAL = Field[int]("failed_trial", "trial system", "int", "worker (RetryCallback)", ("status",),
                          "the first trial of a retry's lineage (Optuna's own key)")
FIXED_PARAMS = Field[dict[str, Any]]("fixed_params", "trial system", "dict", "budget (enqueue_trial), worker (claim)",
                                     ("budget", "array_worker", "array_structure"),
                                     "values the sampler does not propose: a first trial's, or an array's "
                                     "structure on a member (Optuna's own key)")

# --------------------------------------------------------------------------- a study

STUDY_CONFIG = Field[dict[str, Any]]("sweeper:config", "study system", "dict (passwords masked)", "configuration",
                                     ("configuration", "proxy"),
                                     "the configuration the study was created with; machines that launch or join "
                                     "it must agree")
ARTIFACT_STORE = Field[str]("artifact_store", "study user", "str", "checkpoints", ("checkpoints",),
                            "the `artifacts` the sweep was launched with, when one was named")
TEST = Family[dict[str, float]]("test:", "study user", "{metric: value}", "finalize", ("finalize", "best"),
                                "held-out test figures of a trial (test:<number>)")
BEST_TEST = Field[dict[str, Any]]("best_test", "study user", "{trial, metric, value, all}", "finalize", ("status", "launcher"),
                                  "the held-out test figure of the best trial")
CHECKPOINT_DELETED = Family[int]("checkpoint_deleted:", "study user", "int (k)", "checkpoints",
                                 ("checkpoints",),
                                 "keep-top-k removed this trial's checkpoint (checkpoint_deleted:<number>)")
N_TRIALS = Field[int]("sweeper:n_trials", "study system", "int", "budget, best (--seeds)", ("status", "proxy", "cli", "launcher", "pbt"),
                      "the trial budget; marks a study as sweeper's")
POPULATION = Field[int]("sweeper:population", "study system", "int", "launcher", ("launcher",),
                        "scheduler=\"pbt\": the members, fixed by the first launch (`population`, or its worker slots)")
HEAD_PROBE = Field[dict[str, Any]]("sweeper:head_probe", "study system", "{id, examples, accuracy, seconds}",
                                  "head_probe", ("head_probe",),
                                  "head_init=\"probe\": the artifact of the linear probe every trial's head starts "
                                  "from, published by the first worker that fitted one")
DEADLINE = Field[float | None]("sweeper:deadline", "study system", "float (epoch s) or None", "launcher", ("budget",),
                               "after this, no new trial starts (--timeout)")
GPU_SECONDS_BUDGET = Field[float | None]("sweeper:gpu_seconds_budget", "study system", "float (s) or None", "launcher",
                                         ("budget",), "device-seconds the sweep may spend (--gpu-hours)")
SOUP = Family[dict[str, Any]]("soup:", "study user",
                              "{method, metric, members, weights, validation, best_trial, best_validation, test?, "
                              "best_test?}", "best", ("report",),
                              "the weight soup `sweeper best --soup` wrote (soup:greedy, soup:uniform), beside the best trial")
SEEDS = Family[dict[str, Any]]("seeds:", "study user",
                               "{trial, metric, seed_trials, seeds, validation, test, original}", "best", ("report",),
                               "`sweeper best --seeds`: mean, std and stderr of validation and test over the seed "
                               "trials of a trial (seeds:<number>), and that trial's own figures")

# Every field above, in the order of this file (which is the order of docs/records.md).
FIELDS: tuple[Field[Any] | Family[Any], ...] = tuple(
    value for value in list(globals().values()) if isinstance(value, Field | Family))


def table() -> str:
    """The fields as a Markdown table: ``docs/records.md`` holds exactly this."""
    rows = ["| key | where | value | written by | read by | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    for f in FIELDS:
        key = f"`{f.key}`" if isinstance(f, Field) else f"`{f.prefix}…`"
        rows.append(f"| {key} | {f.scope} | {f.kind} | {f.writer} | {', '.join(f.readers) or '-'} | {f.meaning} |")
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- ranking


def direction_of(value: str | StudyDirection) -> StudyDirection:
    """Optuna's direction for a study file's ``"maximize"`` / ``"minimize"`` (or a direction)."""
    return value if isinstance(value, StudyDirection) else StudyDirection[value.upper()]


def better(candidate: float, incumbent: float | None, direction: StudyDirection) -> bool:
    """True when ``candidate`` beats ``incumbent`` (strictly: a tie keeps the incumbent)."""
    if incumbent is None:
        return True
    return candidate > incumbent if direction == StudyDirection.MAXIMIZE else candidate < incumbent


def ranked(trials: Iterable[FrozenTrial], direction: StudyDirection, *,
           with_checkpoint: bool = True) -> list[FrozenTrial]:
    """Complete trials (with a checkpoint, unless told otherwise), best first; a tie goes to
    the earlier trial. The launcher's progress line, ``status``, ``report``, ``best``,
    keep-top-k and ``finalize`` all rank with this."""
    # A seed trial (REPEAT) measures the noise of a configuration already chosen: never a candidate.
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
            and (not with_checkpoint or CHECKPOINT.get(t)) and not REPEAT.get(t)]
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    return sorted(done, key=lambda t: (sign * float(t.value), t.number))  # type: ignore[arg-type]


def best(trials: Iterable[FrozenTrial], direction: StudyDirection) -> FrozenTrial | None:
    """The best complete trial, checkpoint or not (what the progress line and status show)."""
    order = ranked(trials, direction, with_checkpoint=False)
    return order[0] if order else None
