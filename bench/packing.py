"""Several trials at once on one GPU (``--workers-per-gpu``) against one-at-a-time ``Trainer``.

    python bench/packing.py                                  # GPU-sized where there is a GPU
    python bench/packing.py --device cuda --workers-per-gpu 1,2,4,6,8
    python bench/packing.py --device cpu                     # CPU-sized: only checks that it runs

A fixed, realistic mix of trials (MiniLM-L6 on SST-2 sentences, every unfreeze depth 0..6
twice, as a sweep over ``Int(0, 6)`` draws them, learning rates spread over 2e-5..2e-4) is
run three ways, and the figure is *trial-epochs per GPU-hour* (each epoch with its
evaluation on SST-2 validation, as a sweep's pruning points need):

- Hugging Face ``Trainer``, one trial at a time, inputs padded to 128, blocks below the depth
  frozen with ``requires_grad=False`` (how most recipes freeze): the baseline;
- sweeper's loop, one trial at a time (frozen-prefix cache on, kept across the trials of the
  worker process as a real worker keeps it);
- sweeper's loop in K worker processes sharing the GPU (``sweeper launch --workers-per-gpu K``
  places K workers on each GPU in the same way), pulling trials from one queue.

Processes start (and import torch) before the clock starts, as a sweep's workers do once for
many trials. Every ratio is against the Trainer baseline measured in the same run. On a CPU
the processes share two cores, so packing cannot gain there: the CPU-sized run only shows
that the script works.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queue_module
import tempfile
import time
from pathlib import Path
from typing import Any

import common

DEPTHS = [0, 1, 2, 3, 4, 5, 6]


def mix(repeats: int) -> list[dict[str, Any]]:
    """The trials: every depth ``repeats`` times, learning rates spread log-uniformly."""
    trials = []
    rates = [2e-5, 4e-5, 8e-5, 1.2e-4, 2e-4]
    for r in range(repeats):
        for i, depth in enumerate(DEPTHS):
            trials.append({"depth": depth, "learning_rate": rates[(i + 2 * r) % len(rates)]})
    return trials


def _data(samples: int, eval_samples: int | None) -> tuple[list, list]:
    return common.read_sst2("train", samples, seed=0), common.read_sst2("validation", eval_samples)


def sweeper_worker(queue: Any, results: Any, ready: Any, go: Any, device: str, samples: int,
                   eval_samples: int | None, epochs: int, threads: int, compile_blocks: bool) -> None:
    """One packed worker: trials from ``queue`` until it is empty, with one cache for all."""
    common.quiet()
    import torch
    from transformers import AutoTokenizer

    from sweeper.finetune.data import PreparedData
    from sweeper.finetune.loop import Hyper, LoopSettings, train
    from sweeper.finetune.model_specs import TextClassifier

    torch.set_num_threads(threads)
    train_rows, eval_rows = _data(samples, eval_samples)
    tokenizer = AutoTokenizer.from_pretrained(str(common.minilm()))
    data = PreparedData(common.text_split(tokenizer, train_rows), common.text_split(tokenizer, eval_rows), None, 2)
    spec = TextClassifier(str(common.minilm()))
    with tempfile.TemporaryDirectory() as tmp:
        spec.build(2, Path(tmp))  # load the weights once, before the clock
        if device == "cuda":
            torch.zeros(1, device="cuda")  # the CUDA context too
        ready.release()
        go.wait()
        while True:
            try:
                item = queue.get_nowait()
            except queue_module.Empty:
                break
            torch.manual_seed(0)
            adapter = spec.build(2, Path(tmp))
            settings = LoopSettings(epochs=epochs, metric="accuracy", direction="maximize",
                                    device=torch.device(device), seed=0, compile=compile_blocks)
            result = train(adapter, data, Hyper(learning_rate=item["learning_rate"], batch_size=32,
                                                unfreeze_depth=item["depth"]), settings)
            results.put({**item, "accuracy": result.best_value, "epochs": epochs, "finished": time.time()})


def run_sweeper(workers: int, trials: list[dict[str, Any]], args: argparse.Namespace, device: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    for item in trials:
        queue.put(item)
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=sweeper_worker, args=(queue, results, ready, go, device, args.samples,
                                                      args.eval_samples, args.epochs, args.threads, args.compile))
             for _ in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    start = time.time()
    go.set()
    done = [results.get() for _ in trials]
    for p in procs:
        p.join()
    wall = max(d["finished"] for d in done) - start
    return {"wall_s": wall, "trial_epochs": sum(d["epochs"] for d in done),
            "mean_accuracy": sum(d["accuracy"] for d in done) / len(done)}


def run_trainer(trials: list[dict[str, Any]], args: argparse.Namespace, device: str) -> dict[str, Any]:
    """One trial at a time, each with Trainer, padded to 128, bottom frozen by requires_grad."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    train_rows, eval_rows = _data(args.samples, args.eval_samples)
    tokenizer = AutoTokenizer.from_pretrained(str(common.minilm()))

    def encode(rows: list) -> list[dict[str, Any]]:
        enc = tokenizer([s for s, _ in rows], truncation=True, max_length=128, padding="max_length")
        return [{**{k: enc[k][i] for k in enc}, "labels": y} for i, (_, y) in enumerate(rows)]

    train_set, eval_set = encode(train_rows), encode(eval_rows)
    accuracies = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        for item in trials:
            torch.manual_seed(0)
            net = AutoModelForSequenceClassification.from_pretrained(str(common.minilm()), num_labels=2,
                                                                     dtype=torch.float32)
            layers = net.bert.encoder.layer
            if item["depth"] < len(layers):
                for module in [net.bert.embeddings, *layers[: len(layers) - item["depth"]]]:
                    module.requires_grad_(False)
            targs = common.training_arguments(
                output_dir=tmp, per_device_train_batch_size=32, per_device_eval_batch_size=64,
                num_train_epochs=args.epochs, learning_rate=item["learning_rate"], warmup=0.06,
                bf16=device == "cuda", use_cpu=device == "cpu", logging_strategy="no", save_strategy="no",
                eval_strategy="epoch", report_to=[], disable_tqdm=True, seed=0,
            )
            trainer = Trainer(model=net, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                              data_collator=DataCollatorWithPadding(tokenizer),
                              compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
            trainer.train()
            accuracies.append(trainer.evaluate()["eval_accuracy"])
        wall = time.time() - start
    return {"wall_s": wall, "trial_epochs": len(trials) * args.epochs, "mean_accuracy": sum(accuracies) / len(accuracies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.device_arg(parser)
    parser.add_argument("--workers-per-gpu", default=None, help="comma-separated K values (default 1,2,4,6 on cuda, 1,2 on cpu)")
    parser.add_argument("--samples", type=int, help="training sentences per trial (default 10,000 on cuda, 256 on cpu)")
    parser.add_argument("--eval-samples", type=int, help="SST-2 validation sentences (default all 872 on cuda, 128 on cpu)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="times each depth 0..6 is in the mix (default 2 on cuda, 1 on cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="sweeper's trials with compile=True (each worker's first trial pays the compiler, on the clock)")
    args = parser.parse_args()
    device = common.resolve_device(args.device, args.threads)
    common.quiet()
    gpu = device == "cuda"
    args.samples = args.samples or (10_000 if gpu else 256)
    args.eval_samples = args.eval_samples or (None if gpu else 128)
    args.epochs = args.epochs or 1
    trials = mix(args.repeats or (2 if gpu else 1))
    ks = [int(k) for k in (args.workers_per_gpu or ("1,2,4,6" if gpu else "1,2")).split(",")]
    print(f"{len(trials)} trials (depths {DEPTHS}), {args.samples} sentences x {args.epochs} epochs each, "
          f"{device}; machine {common.machine()}")

    rows = []
    base = run_trainer(trials, args, device)
    rows.append({"contender": "Trainer, one at a time, padded to 128", **base})
    for k in ks:
        figures = run_sweeper(k, trials, args, device)
        label = f"sweeper, {k} worker{'s' if k > 1 else ''} per GPU" + (", compiled" if args.compile else "")
        rows.append({"contender": label, **figures})
    for row in rows:
        row["trial-epochs/GPU-hour"] = row["trial_epochs"] / (row["wall_s"] / 3600)
        row["x Trainer"] = row["trial-epochs/GPU-hour"] / rows[0]["trial-epochs/GPU-hour"]
    print(common.table(rows, ["contender", "wall_s", "trial_epochs", "trial-epochs/GPU-hour", "x Trainer",
                              "mean_accuracy"]))
    common.finish(args, {"machine": common.machine(), "device": device, "trials": trials,
                         "samples": args.samples, "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()
