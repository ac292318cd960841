"""What one trial of fixed settings reaches on SST-2 validation, evaluation by evaluation.

    python bench/recipe_probe.py --learning-rate 1e-4 --epochs 3          # all of SST-2 train
    python bench/recipe_probe.py --device cuda --learning-rate 2e-4 --depth 3 --weight 0.1

Not a race against a baseline: a probe for the full-train target of issue 7 (a sweep's best
of at least 90.5% on SST-2 validation with MiniLM-L6), which a sweep of a few minutes on one
GPU can only meet if trials of its space reach it in the epochs it gives them. One trial of
sweeper's loop (MiniLM-L6, batch 32, ``distill`` at λ = ``--weight``) trains on the 95% of
SST-2 train a study keeps for training (its random 5% split, seed 0) and is scored on all
872 sentences of SST-2 validation at every evaluation (``--evals-per-epoch``), which a sweep
never does: here nothing is selected, so nothing is flattered. Accuracy does not depend on
the device beyond rounding, so a CPU answers it too, slowly (about a quarter of an hour an epoch
with one thread on this project's machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.device_arg(parser)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--depth", type=int, default=6, help="unfreeze depth (6: every block of MiniLM-L6)")
    parser.add_argument("--weight", type=float, default=0.01, help="λ of the distill term")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--evals-per-epoch", type=int, default=2)
    parser.add_argument("--samples", type=int, help="training sentences before the split (default all 67,349)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = common.resolve_device(args.device, args.threads)
    common.quiet()
    import torch
    from transformers import AutoTokenizer

    from sweeper.finetune.data import PreparedData, _carve
    from sweeper.finetune.loop import Hooks, Hyper, LoopSettings, train
    from sweeper.finetune.model_specs import TextClassifier

    rows = common.read_sst2("train", args.samples, seed=0)
    keep, _held_out = _carve(len(rows), 0.05, 0)  # what a study trains on: its validation split stays out
    train_rows = [rows[i] for i in keep]
    model = common.minilm()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    data = PreparedData(common.text_split(tokenizer, train_rows),
                        common.text_split(tokenizer, common.read_sst2("validation")), None, 2)
    hyper = Hyper(learning_rate=args.learning_rate, weight_decay=args.weight_decay, unfreeze_depth=args.depth,
                  pretrain_loss_weight=args.weight, batch_size=32)
    print(f"{len(train_rows)} training examples, 872 SST-2 validation sentences, {device}; {hyper}; "
          f"machine {common.machine()}", flush=True)
    started = time.time()
    curve: list[dict[str, Any]] = []

    class Record(Hooks):
        def evaluated(self, evaluation: int, value: float, all_metrics: dict[str, float], improved: bool,
                      snapshot: Any) -> None:
            epoch = evaluation / args.evals_per_epoch  # evaluations count from 1
            curve.append({"epoch": epoch, "seconds": time.time() - started, "accuracy": value})
            print(f"  epoch {epoch:4.1f}  {time.time() - started:7.0f} s  SST-2 validation {value:.4f}", flush=True)

    torch.manual_seed(args.seed)  # the new head's weights; the loop seeds batch order and dropout
    with tempfile.TemporaryDirectory() as tmp:
        adapter = TextClassifier(str(model)).build(2, Path(tmp))
        settings = LoopSettings(epochs=args.epochs, metric="accuracy", direction="maximize",
                                device=torch.device(device), seed=args.seed, pretrain_loss="distill",
                                evals_per_epoch=args.evals_per_epoch)
        result = train(adapter, data, hyper, settings, Record())
    print(f"best {result.best_value:.4f} at epoch {result.best_evaluation / args.evals_per_epoch:.1f}; "
          f"{result.samples_per_second:.0f} samples/s")
    common.finish(args, {"machine": common.machine(), "device": device, "hyper": vars(hyper),
                         "epochs": args.epochs, "curve": curve, "best": result.best_value,
                         "samples_per_second": result.samples_per_second})


if __name__ == "__main__":
    main()
