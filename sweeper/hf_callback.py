"""An existing Hugging Face ``Trainer`` script as a sweeper trial (issue 20; ``pip install
'sweeper[trainer]'``)::

    def train(params, device, seed, context):
        resume = SweeperCallback.resume_checkpoint(context, "out/")     # None on a first attempt
        args = TrainingArguments("out/", learning_rate=params["learning_rate"], seed=seed,
                                 eval_strategy="epoch", save_strategy="epoch", ...)
        trainer = Trainer(model, args, ..., callbacks=[SweeperCallback(context)])
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model("out/best")
        context.save_model("out/best")

Each evaluation is reported (the study's metric, ``eval_<metric>``, as the value); the pruner
stops training through ``control``; every checkpoint the Trainer saves becomes the trial's
resume state in sweeper's store, so a retry after ``kill -9`` resumes the Trainer from it; a
worker being stopped makes the Trainer save once more and stop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sweeper.user_train import TrialContext, UserCodeError

RESUME_FOLDER = "sweeper-resume"  # under the Trainer's output_dir: where a retry's checkpoint is put back


class SweeperCallback(TrainerCallback):
    """Reports, prunes, keeps the resume state and stops on preemption, for one ``Trainer``."""

    def __init__(self, context: TrialContext, metric_key: str | None = None) -> None:
        self.context = context
        self.metric_key = metric_key or f"eval_{context.metric}"

    @staticmethod
    def resume_checkpoint(context: TrialContext, output_dir: str | Path) -> str | None:
        """The checkpoint folder a retry resumes the Trainer from, or None on a first attempt."""
        folder = Path(output_dir) / RESUME_FOLDER
        return str(folder) if context.load(folder=folder) is not None else None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        metrics = metrics or {}
        if self.metric_key not in metrics:
            raise UserCodeError(f"the Trainer's evaluation has no {self.metric_key!r} (it has "
                                f"{', '.join(sorted(metrics)) or 'nothing'}): return it from compute_metrics, "
                                "or give SweeperCallback(context, metric_key=...)")
        others = {key.removeprefix("eval_"): float(value) for key, value in metrics.items()
                  if key != self.metric_key and isinstance(value, (int, float)) and math.isfinite(value)}
        try:
            self.context.report(metrics[self.metric_key], **others)
        except optuna.TrialPruned:  # the context remembers it; the Trainer stops at the end of this step
            control.should_training_stop = True
            control.should_save = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.context.stop.is_set():  # preempted: one last checkpoint, then stop
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.context.save({"global_step": state.global_step}, folder=folder)
