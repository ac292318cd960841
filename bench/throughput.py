"""One full fine-tuning trial: sweeper's loop against Hugging Face ``Trainer``, in one run.

    python bench/throughput.py                      # GPU-sized where there is a GPU, else CPU-sized
    python bench/throughput.py --device cpu         # CPU-sized: 512 SST-2 sentences, MiniLM only
    python bench/throughput.py --device cuda --models minilm,bert-base   # 20,000 sentences; --samples 0: all

Same model, same sentences, same batch size (32), same device and precision (bf16 autocast on
a GPU, fp32 on a CPU), one epoch each, full fine-tuning (``unfreeze_depth`` = all blocks, so
the frozen-prefix cache plays no part):

- ``Trainer`` with inputs padded to 128 tokens (``run_glue.py``'s default): the baseline;
- ``Trainer`` with dynamic padding (``DataCollatorWithPadding``);
- sweeper's loop as a trial runs it (length-bucketed batches, the loss checked for NaN every
  32 steps rather than after each, so the host does not wait for the device every step);
- the same with the next batch padded and copied on a thread during the step (``prefetch``:
  the default until the first GPU run showed it slower, see bench/README.md);
- the same checking the loss after every step: what the removed synchronisations are worth;
- the same with ``compile=True``: the trainable blocks through ``torch.compile`` (inductor),
  measured after a compiled warm-up trial in the same process, as every trial of a worker
  after its first runs; the warm-up's own time (the compiler's, paid once per worker
  process, less where its on-disk cache already holds the code) is printed beside it;
- on a GPU, the same compiled blocks replayed as CUDA graphs (inductor's ``reduce-overhead``
  mode: one recording per batch shape), the launch overhead's last part.

Samples per second count training only (each contender's own clock around its training
loop; evaluation excluded), and every ratio is against ``Trainer`` padded to 128 measured in
the same process. ``bert-base`` is BERT-base's shape (12 blocks, 768 wide) with random
weights, GPU-sized only by default. The issue's H100 figures for comparison: Trainer padded
1,080 samples/s, dynamic 900, a plain bucketed loop 1,220; BERT-base shape padded 620.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import common


def sweeper_trial(model: Path, train_rows: list, eval_rows: list, device: str, batch_size: int,
                  workdir: Path, **settings: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from sweeper.finetune import prefix
    from sweeper.finetune.data import PreparedData
    from sweeper.finetune.loop import Hyper, LoopSettings, train
    from sweeper.finetune.model_specs import TextClassifier

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    train_split = common.text_split(tokenizer, train_rows)
    eval_split = common.text_split(tokenizer, eval_rows)
    data = PreparedData(train_split, eval_split, eval_split, 2)
    torch.manual_seed(0)
    adapter = TextClassifier(str(model)).build(2, workdir)
    loop = LoopSettings(epochs=1, metric="accuracy", direction="maximize", device=torch.device(device),
                        seed=0, evals_per_epoch=1, **settings)
    result = train(adapter, data, Hyper(learning_rate=1e-4, batch_size=batch_size), loop)
    prefix.clear()
    return {"samples_per_s": result.samples_per_second, "accuracy": result.best_metrics["accuracy"],
            "train_s": result.train_seconds}


def trainer_trial(model: Path, train_rows: list, eval_rows: list, device: str, batch_size: int,
                  workdir: Path, pad_to_128: bool) -> dict[str, Any]:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    padding = "max_length" if pad_to_128 else False

    def encode(rows: list) -> list[dict[str, Any]]:
        enc = tokenizer([s for s, _ in rows], truncation=True, max_length=128, padding=padding)
        return [{**{k: enc[k][i] for k in enc}, "labels": y} for i, (_, y) in enumerate(rows)]

    torch.manual_seed(0)
    net = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=2, dtype=torch.float32)
    args = common.training_arguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64, num_train_epochs=1, learning_rate=1e-4, warmup=0.06,
        bf16=device == "cuda", use_cpu=device == "cpu", logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=net, args=args, train_dataset=encode(train_rows), eval_dataset=encode(eval_rows),
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    out = trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    del trainer, net
    gc.collect()
    return {"samples_per_s": out.metrics["train_samples_per_second"], "accuracy": accuracy,
            "train_s": out.metrics["train_runtime"]}


# key -> (label, run, options): what --contenders picks from.
CONTENDERS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "padded": ("Trainer, padded to 128", trainer_trial, {"pad_to_128": True}),
    "dynamic": ("Trainer, dynamic padding", trainer_trial, {"pad_to_128": False}),
    "sweeper": ("sweeper", sweeper_trial, {}),
    "prefetch": ("sweeper, batches prefetched on a thread", sweeper_trial, {"prefetch": True}),
    "every-step": ("sweeper, loss checked every step", sweeper_trial, {"check_every_steps": 1}),
    "compiled": ("sweeper, compiled", sweeper_trial, {"compile": True}),
    "cuda-graphs": ("sweeper, compiled with CUDA graphs", sweeper_trial,
                    {"compile": True, "compile_mode": "reduce-overhead"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.device_arg(parser)
    parser.add_argument("--models", help="comma-separated: minilm, bert-base (default: both on cuda, minilm on cpu)")
    parser.add_argument("--samples", type=int, help="training sentences (default 20,000 on cuda, 512 on cpu; 0 = all 67,349)")
    parser.add_argument("--eval-samples", type=int, help="SST-2 validation sentences scored after training "
                                                          "(default: all 872 on cuda, 256 on cpu)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="run every contender this many times; the best counts")
    parser.add_argument("--contenders", help=f"comma-separated, from {', '.join(CONTENDERS)} (default: all; "
                                             "cuda-graphs on a GPU only); the baseline, padded, always runs")
    args = parser.parse_args()
    device = common.resolve_device(args.device, args.threads)
    chosen = ["padded", *(k for k in (args.contenders or ",".join(CONTENDERS)).split(",") if k != "padded")]
    unknown = [k for k in chosen if k not in CONTENDERS]
    if unknown:
        parser.error(f"--contenders {','.join(unknown)}: unknown; use {', '.join(CONTENDERS)}")
    if device != "cuda":  # CUDA graphs exist on GPUs only
        chosen = [k for k in chosen if k != "cuda-graphs"]
    common.quiet()
    gpu = device == "cuda"
    models = (args.models or ("minilm,bert-base" if gpu else "minilm")).split(",")
    samples = (args.samples or None) if args.samples is not None else (20_000 if gpu else 512)
    train_rows = common.read_sst2("train", samples, seed=0)
    eval_rows = common.read_sst2("validation", args.eval_samples or (None if gpu else 256))
    print(f"{len(train_rows)} training sentences, batch {args.batch_size}, 1 epoch, full fine-tuning, "
          f"{device}; machine {common.machine()}")

    results: dict[str, Any] = {"machine": common.machine(), "device": device, "samples": len(train_rows),
                               "batch_size": args.batch_size, "models": {}}
    with tempfile.TemporaryDirectory(prefix="sweeper-bench-") as tmp:
        workdir = Path(tmp)
        for name in models:
            path = common.minilm() if name == "minilm" else common.random_bert(workdir / "bert-base", common.minilm())
            common_args = (path, train_rows, eval_rows, device, args.batch_size, workdir)
            contenders = {CONTENDERS[key][0]: CONTENDERS[key][1:] for key in chosen}
            # Not counted: the first trial on a device pays for its libraries' set-up, and the
            # first compiled one for the compiler.
            def warm_up(path: Path = path, **options: Any) -> float:  # bound now: called before the loop moves on
                started = time.perf_counter()
                sweeper_trial(path, train_rows[:256], eval_rows[:64], device, args.batch_size, workdir, **options)
                return time.perf_counter() - started

            warm_up()
            compile_seconds = warm_up(compile=True) if "compiled" in chosen else None
            if "cuda-graphs" in chosen:
                warm_up(compile=True, compile_mode="reduce-overhead")
            best: dict[str, dict[str, Any]] = {}
            for _ in range(args.repeats):  # interleaved, so a busy moment hurts every contender alike
                for label, (run, options) in contenders.items():
                    figures = run(*common_args, **options)
                    if label not in best or figures["samples_per_s"] > best[label]["samples_per_s"]:
                        best[label] = figures
            base = best["Trainer, padded to 128"]["samples_per_s"]
            rows = [{"contender": label, "samples/s": f["samples_per_s"], "x Trainer padded": f["samples_per_s"] / base,
                     "accuracy": f["accuracy"]} for label, f in best.items()]
            print(f"\n{name} ({path.name})")
            print(common.table(rows, ["contender", "samples/s", "x Trainer padded", "accuracy"]))
            if compile_seconds is not None:
                print(f"compiled warm-up trial (256 sentences, the compiler's work included): {compile_seconds:.1f} s")
                results.setdefault("compile_warm_up_s", {})[name] = compile_seconds
            results["models"][name] = rows
    common.finish(args, results)


if __name__ == "__main__":
    main()
