"""A trial run by the user's own training function (``Sweep(train=...)``, issue 20).

Everything around the trial stays sweeper's: the ticket it was claimed from, the worker's
heartbeat, the retry that resumes it, the budget it spends, keep-top-k and ``sweeper best``.
The function is handed the trial's hyperparameters, its device, its seed and a
:class:`TrialContext`, and trains however it likes::

    def train(params, device, seed, context):
        state = context.load() or {"epoch": 0}          # a retry continues where the last attempt saved
        for epoch in range(state["epoch"], 3):
            ...
            context.report(accuracy, loss=loss)          # may end the trial: the pruner said so
            context.save({"epoch": epoch + 1, ...})      # the resume state, for a retry
            if context.should_stop():                    # preempted: save, then return
                return
        context.save_model("out/")                       # the folder `sweeper best` hands out

What the function does wrong ends its trial with one line, and the sweep goes on: it never
reports, reports a value that is not a finite number, raises, saves no model, or keeps going
for longer than ``STOP_GRACE_S`` after ``should_stop()`` turned true.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from sweeper import checkpoints, record
from sweeper.errors import SweepError
from sweeper.finetune.loop import Preempted  # the objective hands a preempted trial back, whoever trained it

logger = logging.getLogger(__name__)

STOP_GRACE_S = 60.0  # after should_stop() turns true, the function has this long to return
TrainFunction = Callable[[dict[str, Any], torch.device, int, "TrialContext"], Any]


class UserCodeError(SweepError):
    """What the user's function did wrong, in one line: the trial fails with it."""


class StopIgnored(Exception):
    """The function kept going past the grace time after ``should_stop()``."""


@dataclass
class _Reported:
    evaluation: int
    value: float
    metrics: dict[str, float]


@dataclass
class TrialContext:
    """What a user's training function may ask of sweeper, for one trial."""

    trial: optuna.Trial
    study: optuna.Study
    store: Any
    direction: optuna.study.StudyDirection
    metric: str
    stop: threading.Event
    history: list[int]  # the trials this retry continues, oldest first
    sweep: Any = None  # the study's Sweep: a `model` and `data` given beside `train` are read from it
    grace_s: float = field(default_factory=lambda: STOP_GRACE_S)  # read when the trial starts
    reported: list[_Reported] = field(default_factory=list)
    pruned: str | None = None  # why, once the pruner stopped the trial
    model_folder: Path | None = None
    _stop_seen_at: float | None = None
    _scratch: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------------ reports and pruning

    def report(self, value: float, **metrics: float) -> None:
        """One evaluation of the trial: ``value`` is the study's metric, ``metrics`` the rest
        (recorded as ``val_<name>``). Raises ``optuna.TrialPruned`` when the pruner stops the
        trial: let it propagate (or return); the trial ends pruned either way."""
        self._check_stop()
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UserCodeError(f"the train function reported {value!r} at evaluation {len(self.reported) + 1}: "
                                f"report a finite number (the validation {self.metric})")
        evaluation = len(self.reported) + 1
        clean = {name: float(v) for name, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.reported.append(_Reported(evaluation, float(value), {self.metric: float(value), **clean}))
        self.trial.report(float(value), evaluation)
        record.PROGRESS.set(self.trial, {"evaluation": evaluation, "of": None, "value": float(value)})
        logger.info("trial %d evaluation %d: %.4f", self.trial.number, evaluation, value)
        if self.trial.should_prune():
            self.pruned = f"pruned at evaluation {evaluation} with {value:.4f}"
            raise optuna.TrialPruned(self.pruned)

    def should_stop(self) -> bool:
        """True once the worker is being stopped (preemption, Ctrl-C): save and return."""
        self._check_stop()
        return self.stop.is_set()

    def _check_stop(self) -> None:
        if not self.stop.is_set():
            return
        now = time.monotonic()
        self._stop_seen_at = self._stop_seen_at or now
        if now - self._stop_seen_at > self.grace_s:
            raise StopIgnored(f"the train function ignored should_stop() for more than {self.grace_s:g} s")

    # ------------------------------------------------------------------ resume state

    def save(self, state: dict[str, Any], folder: str | Path | None = None) -> None:
        """Keep ``state`` as the trial's resume state (tensors, numbers, strings, lists and
        dicts: what ``torch.load(weights_only=True)`` reads back), and with it the files of
        ``folder`` (a Trainer's ``checkpoint-N``, say); a retry's ``load()`` gets them back."""
        self._check_stop()
        blob = io.BytesIO()
        saved: dict[str, Any] = {"state": state, "reported": [vars(r) for r in self.reported]}
        if folder is not None:
            saved["folder"] = _packed(Path(folder))
        try:
            torch.save(saved, blob)
            data = blob.getvalue()
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:
            raise UserCodeError(f"the train function saved a state that cannot be read back safely "
                                f"({' '.join(str(exc).split())[:160]}): save tensors, numbers, strings, lists "
                                "and dicts") from None
        artifact_id = f"resume-{uuid.uuid4().hex}"
        try:
            self.store.write(artifact_id, io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001  (a full store loses the resume point, not the trial)
            logger.warning("trial %d: cannot save its resume state (%s)", self.trial.number, exc)
            return
        previous = record.RESUME.get(self.trial)
        record.RESUME.set(self.trial, {"id": artifact_id, "step": len(self.reported),
                                       "sha256": hashlib.sha256(data).hexdigest()})
        if previous:
            checkpoints.remove_quietly(self.store, previous["id"])

    def load(self, folder: str | Path | None = None) -> dict[str, Any] | None:
        """The state the latest earlier attempt of this trial saved, or None for a fresh start;
        the files saved with it are written into ``folder``. Its reports are reported again, so
        the trial's curve is whole."""
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number in reversed(self.history):
            earlier: FrozenTrial | None = by_number.get(number)
            info = record.RESUME.get(earlier) if earlier else None
            if not info:
                continue
            try:
                with self.store.open_reader(info["id"]) as reader:
                    data = reader.read()
                if hashlib.sha256(data).hexdigest() != info.get("sha256"):
                    raise ValueError("its SHA-256 does not match the one recorded")
                saved = torch.load(io.BytesIO(data), weights_only=True)
            except Exception as exc:  # noqa: BLE001  (unreadable: start over rather than fail)
                logger.warning("resume state of trial %d unreadable (%s); starting over", number, exc)
                return None
            self.reported = []
            for item in saved["reported"]:
                self.reported.append(_Reported(int(item["evaluation"]), float(item["value"]), dict(item["metrics"])))
                self.trial.report(float(item["value"]), int(item["evaluation"]))
            if folder is not None and "folder" in saved:
                _unpack(saved["folder"], Path(folder))
            record.RESUMED_FROM_STEP.set(self.trial, len(self.reported))
            logger.info("trial %d continues trial %d after %d evaluations", self.trial.number, number,
                        len(self.reported))
            return dict(saved["state"])
        return None

    # ------------------------------------------------------------------ the model

    @property
    def scratch(self) -> Path:
        """A folder of this trial's own for the function's files, removed when the trial ends."""
        return Path(self._scratch_dir().name) / "work"

    def _scratch_dir(self) -> tempfile.TemporaryDirectory[str]:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="sweeper-trial-")
            (Path(self._scratch.name) / "work").mkdir()
        return self._scratch

    def save_model(self, folder: str | Path) -> None:
        """The model as the folder ``sweeper best`` will hand out (``save_pretrained``'s, say):
        copied now; uploaded with SHA-256s when the trial ends. A later call replaces it."""
        self._check_stop()
        source = Path(folder)
        if not source.is_dir() or not any(source.iterdir()):
            raise UserCodeError(f"save_model({str(folder)!r}): not a folder with files in it: save the model "
                                "(e.g. model.save_pretrained(folder)) first")
        target = Path(self._scratch_dir().name) / "model"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        # `sweeper best` hands out flat folders of formats that cannot run code when loaded:
        # pickles (a Trainer's training_args.bin, say) and subfolders stay behind, and the log says so.
        left = []
        for item in sorted(source.iterdir()):
            if item.is_file() and not item.name.lower().endswith(checkpoints.UNSAFE_SUFFIXES):
                shutil.copy2(item, target / item.name)
            else:
                left.append(item.name)
        if not any(target.iterdir()):
            raise UserCodeError(f"save_model({str(folder)!r}): nothing in it that `sweeper best` may hand out (it "
                                f"has {', '.join(left)}): save the weights as safetensors "
                                "(save_pretrained does by default)")
        if left:
            logger.info("trial %d: the model folder's %s stay out of its checkpoint (pickles and subfolders "
                        "are never handed out)", self.trial.number, ", ".join(left))
        self.model_folder = target

    def best(self) -> _Reported:
        """The trial's best evaluation: its value, as for every trial of sweeper's."""
        if not self.reported:
            raise UserCodeError(f"the train function returned without reporting: call context.report(value) "
                                f"with the validation {self.metric} at each evaluation")
        winner = self.reported[0]
        for item in self.reported[1:]:
            if record.better(item.value, winner.value, self.direction):
                winner = item
        return winner

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()


class _Folder:
    """A saved folder, shaped as checkpoints.save_model expects of a model."""

    kind = "user"

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, folder: Path, tokenizer: Any = None) -> None:
        for item in self.path.iterdir():  # flat: save_model copied files only
            shutil.copy2(item, folder / item.name)


def _packed(folder: Path) -> torch.Tensor:
    """The files of ``folder`` as one tar archive, held in a byte tensor (what a safe load reads)."""
    if not folder.is_dir():
        raise UserCodeError(f"save(folder={str(folder)!r}): not a folder: give the folder to keep with the state")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(folder, arcname=".")
    return torch.frombuffer(bytearray(archive.getvalue()), dtype=torch.uint8)


def _unpack(packed: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(packed.numpy().tobytes()), mode="r") as tar:
        tar.extractall(folder, filter="data")  # no absolute paths, no links out of the folder


def run(train: TrainFunction, trial: optuna.Trial, params: dict[str, Any], context: TrialContext,
        device: torch.device, seed: int, meta: dict[str, Any]) -> float:
    """Run the user's ``train`` for ``trial``; record its result as sweeper's loop would; return
    its value (its best evaluation). Pruned: ``optuna.TrialPruned``; preempted: loop's ``Preempted``."""
    try:
        try:
            train(params, device, seed, context)
        except StopIgnored as exc:
            raise Preempted(str(exc)) from None
        if context.stop.is_set():
            raise Preempted("stopped on request")
        if context.pruned is not None:  # it caught the pruner's signal and returned
            raise optuna.TrialPruned(context.pruned)
        best = context.best()
        if context.model_folder is None:
            raise UserCodeError("the train function saved no model: call context.save_model(folder) with the "
                                "folder `sweeper best` should hand out")
        info = checkpoints.save_model(context.store, trial, _Folder(context.model_folder), None,
                                      {**meta, "value": best.value, "best_evaluation": best.evaluation,
                                       "validation": best.metrics})
        info.update(evaluation=best.evaluation, value=best.value)
        for name, value in best.metrics.items():
            record.VALIDATION.set(trial, name, value)
        record.BEST_EVALUATION.set(trial, best.evaluation)
        record.CHECKPOINT.set(trial, info)
        logger.info("trial %d finished: %s %.4f at evaluation %d", trial.number, context.metric, best.value,
                    best.evaluation)
        return best.value
    finally:
        context.close()
