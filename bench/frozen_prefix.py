"""What a trial below full depth costs, with and without the frozen-prefix cache, in one run.

    python bench/frozen_prefix.py                   # GPU-sized where there is a GPU, else CPU-sized
    python bench/frozen_prefix.py --device cpu      # a 12-block, 128-wide random BERT, 2,048 sentences
    python bench/frozen_prefix.py --device cuda     # BERT-base shape (12 x 768), random weights, 20,000 sentences

A 12-block model trains for three epochs on SST-2 sentences (evaluated after each epoch on
SST-2 validation) at unfreeze depth 12 (full fine-tuning: the reference), 2 and 0, each with
the cache off (the frozen bottom runs in every step and evaluation, under no_grad) and on:
*cold* (the first trial of a worker process: the first epoch fills the cache as it goes)
and *warm* (a later trial of the same worker with the same start block, which finds every
example cached). Cost is the trial's wall time in training and evaluation; every ratio is
against full fine-tuning measured in the same process.

Random weights are enough: the cost of a block does not depend on its values.
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
    parser.add_argument("--samples", type=int, help="training sentences (default 20,000 on cuda, 2,048 on cpu)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, help="width of the 12-block model (default 768 on cuda, 128 on cpu)")
    args = parser.parse_args()
    device = common.resolve_device(args.device, args.threads)
    common.quiet()

    import torch
    from transformers import AutoTokenizer

    from sweeper.finetune import prefix
    from sweeper.finetune.data import PreparedData
    from sweeper.finetune.loop import Hyper, LoopSettings, train
    from sweeper.finetune.model_specs import TextClassifier

    gpu = device == "cuda"
    hidden = args.hidden or (768 if gpu else 128)
    train_rows = common.read_sst2("train", args.samples or (20_000 if gpu else 2048), seed=0)
    eval_rows = common.read_sst2("validation")
    with tempfile.TemporaryDirectory(prefix="sweeper-bench-") as tmp:
        model = common.random_bert(Path(tmp) / "bert", common.minilm(), layers=12, hidden=hidden,
                                   heads=12 if hidden % 64 == 0 and hidden >= 768 else 2)
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        data = PreparedData(common.text_split(tokenizer, train_rows), common.text_split(tokenizer, eval_rows),
                            None, 2)
        spec = TextClassifier(str(model))
        print(f"12 blocks x {hidden}, {len(train_rows)} sentences, {args.epochs} epochs, batch "
              f"{args.batch_size}, {device}; machine {common.machine()}")

        def trial(depth: int, cache: bool, epochs: float = args.epochs) -> dict[str, Any]:
            torch.manual_seed(0)
            adapter = spec.build(2, Path(tmp))
            settings = LoopSettings(epochs=epochs, metric="accuracy", direction="maximize",
                                    device=torch.device(device), seed=0, cache_prefix=cache)
            tick = time.perf_counter()
            result = train(adapter, data, Hyper(learning_rate=1e-4, batch_size=args.batch_size,
                                                unfreeze_depth=depth), settings)
            wall = time.perf_counter() - tick
            return {"seconds": result.train_seconds + result.eval_seconds, "wall": wall,
                    "train_samples_per_s": result.samples_per_second,
                    "accuracy": result.best_metrics["accuracy"]}

        runs: list[tuple[str, int, bool, bool]] = [  # label, depth, cache, clear the cache first
            ("depth 12 (full fine-tuning)", 12, True, True),
            ("depth 2, no cache", 2, False, True),
            ("depth 2, cache cold", 2, True, True),
            ("depth 2, cache warm", 2, True, False),
            ("depth 0, no cache", 0, False, True),
            ("depth 0, cache cold", 0, True, True),
            ("depth 0, cache warm", 0, True, False),
        ]
        trial(12, False, epochs=0.05)  # warm-up, not counted: allocator, kernels, thread pools
        rows = []
        for label, depth, cache, clear in runs:
            if clear:
                prefix.clear()
            figures = trial(depth, cache)
            rows.append({"trial": label, **figures})
        full = rows[0]["seconds"]
        for row in rows:
            row["cost vs full"] = row["seconds"] / full
        print(common.table(rows, ["trial", "seconds", "cost vs full", "train_samples_per_s", "accuracy"]))
        by = {r["trial"]: r for r in rows}
        print(f"\ndepth 2: the cache makes a trial {by['depth 2, no cache']['seconds'] / by['depth 2, cache cold']['seconds']:.2f}x "
              f"cheaper cold and {by['depth 2, no cache']['seconds'] / by['depth 2, cache warm']['seconds']:.2f}x warm")
        print(f"depth 0: {by['depth 0, no cache']['seconds'] / by['depth 0, cache cold']['seconds']:.2f}x cold, "
              f"{by['depth 0, no cache']['seconds'] / by['depth 0, cache warm']['seconds']:.2f}x warm")
    common.finish(args, {"machine": common.machine(), "device": device, "hidden": hidden,
                         "samples": len(train_rows), "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()
