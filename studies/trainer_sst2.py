"""An existing Hugging Face `Trainer` script, swept by sweeper: MiniLM-L6 on SST-2, offline.

    sweeper launch studies/trainer_sst2.py --workers 2     # the sweep (pip install 'sweeper[trainer]')
    python studies/trainer_sst2.py                          # the same Trainer run alone, once

`fine_tune` is an ordinary Trainer script; `train` is all a sweep adds: the trial's values go
into `TrainingArguments`, and `SweeperCallback` reports each evaluation (pruning obeyed), keeps
every Trainer checkpoint as the trial's resume state in sweeper's store, and stops the Trainer
when the worker is stopped. Reads `../shared/models/minilm-l6-h384` and `../shared/data/sst2`
beside the checkout; sized for a CPU (2,000 training sentences, 64 tokens, one epoch, two
evaluations on 400 held-back sentences): raise `TRAIN_ROWS` on a GPU.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sweeper import LogFloat, Sweep, SweeperCallback, TrialContext

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "minilm-l6-h384"
TRAIN_ROWS, VALIDATION_ROWS, MAX_LENGTH, EPOCHS, BATCH = 2000, 400, 64, 1, 32


def sst2(rows: int, skip: int = 0) -> Any:
    """SST-2 training sentences ``skip`` .. ``skip + rows``, tokenised (validation is carved from train)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    with open(SHARED / "data" / "sst2" / "train.tsv", newline="") as file:
        table = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[skip:skip + rows]
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    encoded = tokenizer([r["sentence"] for r in table], truncation=True, max_length=MAX_LENGTH, padding="max_length")
    return Dataset.from_dict({**encoded, "labels": [int(r["label"]) for r in table]})


def accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def fine_tune(params: dict[str, Any], seed: int, out: Path, callbacks: list[Any], resume: str | None = None) -> Any:
    """The Trainer script: nothing in it knows of sweeper."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed

    set_seed(seed)  # the new head's initial weights too, which the model draws before the Trainer seeds
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    steps = TRAIN_ROWS // BATCH
    args = TrainingArguments(
        str(out), learning_rate=params["learning_rate"], weight_decay=params["weight_decay"],
        warmup_steps=params["warmup_ratio"],  # below 1, transformers reads it as a share of the steps
        num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64, eval_strategy="steps", eval_steps=steps // 2, save_strategy="steps",
        save_steps=steps // 2, seed=seed, report_to=[], logging_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=sst2(TRAIN_ROWS),
                      eval_dataset=sst2(VALIDATION_ROWS, skip=TRAIN_ROWS), compute_metrics=accuracy,
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "best"))
    return trainer


def train(params: dict[str, Any], device: Any, seed: int, context: TrialContext) -> None:
    out = context.scratch / "trainer"
    fine_tune(params, seed, out, [SweeperCallback(context)], SweeperCallback.resume_checkpoint(context, out))
    context.save_model(out / "best")


sweep = Sweep(
    name="trainer-sst2",
    train=train,
    space={
        "learning_rate": LogFloat(1e-5, 3e-4),
        "weight_decay": LogFloat(1e-6, 1e-1),
        "warmup_ratio": 0.06,
    },
    metric="accuracy",
    direction="maximize",
    n_trials=6,
    pruner="median",
    keep=2,
)

if __name__ == "__main__":  # the same Trainer, alone: what one trial costs without sweeper
    import tempfile
    import time

    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        params = {"learning_rate": float(sys.argv[1]) if len(sys.argv) > 1 else 5e-5, "weight_decay": 0.01,
                  "warmup_ratio": 0.06}
        result = fine_tune(params, int(sys.argv[2]) if len(sys.argv) > 2 else 0, Path(folder), [])
        evaluations = [round(e["eval_accuracy"], 6) for e in result.state.log_history if "eval_accuracy" in e]
        print(f"alone: validation accuracy at each evaluation {evaluations} in {time.time() - started:.1f} s")
