"""Which validation split picks the trial that does best on SST-2 validation: random or sentences.

    python bench/validation_split.py                 # CPU-sized: 1,200 treebank sentences, 6 trials
    python bench/validation_split.py --device cuda --sentences 3000 --trials 12

A sweep selects its best trial on a validation split carved from the training data and
never sees the data set's own held-out split (here SST-2 validation, 872 whole sentences).
SST-2's training data is every phrase of its sentences' parse trees, so a split carved at
random leaks (``sweeper/finetune/phrases.py``). The script takes a piece of the treebank
that keeps its trees whole (``--sentences`` sentences of SST-2 train and every phrase they
contain), and carves from it, disjointly:

- *random*: a random 5% of its examples (what ``validation_split="random"`` holds out);
- *sentences*: 5% of its sentences with their phrases that no training sentence holds,
  leak-free (what ``validation_split="sentences"`` holds out); also scored on its whole
  sentences alone (*whole sentences only*), which are like SST-2 validation's but few.

Every trial (learning rate and unfreeze depth varied, MiniLM-L6, ``--epochs`` 1) trains on the
rest and is scored on both splits and on SST-2 validation. Printed: each split's mean gap to
SST-2 validation (how much it flatters), its rank correlation with SST-2 validation over the
trials, and the SST-2 validation accuracy of the trial each split would select.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import common


def treebank_piece(rows: list[tuple[str, int]], sentences: int, seed: int) -> list[tuple[str, int]]:
    """``sentences`` random sentences of ``rows`` and every example inside one of them."""
    from sweeper.finetune import phrases

    texts = [s for s, _ in rows]
    chosen = random.Random(seed).sample(sorted(phrases.sentences(texts)), sentences)
    inside = {h for i in chosen for h in phrases.phrase_hashes(texts[i].split())}
    return [row for row in rows if hash(" ".join(row[0].split())) in inside]


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    def ranks(x: list[float]) -> Any:
        return np.argsort(np.argsort(x)).astype(float)

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.device_arg(parser)
    parser.add_argument("--sentences", type=int, help="treebank sentences in the piece (default 1200; 3000 on cuda)")
    parser.add_argument("--trials", type=int, help="trials (default 6; 12 on cuda)")
    parser.add_argument("--fraction", type=float, default=0.05, help="share held out by each split")
    parser.add_argument("--epochs", type=float, default=1, help="epochs per trial (more epochs, more remembering)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = common.resolve_device(args.device, args.threads)
    common.quiet()
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from sweeper.finetune import phrases, prefix
    from sweeper.finetune.data import PreparedData, _carve
    from sweeper.finetune.loop import Hyper, LoopSettings, evaluate, train
    from sweeper.finetune.model_specs import TextClassifier

    gpu = device == "cuda"
    piece = treebank_piece(common.read_sst2("train"), args.sentences or (3000 if gpu else 1200), args.seed)
    test_rows = common.read_sst2("validation")
    # Random first, then the sentence split of what is left: the two never share an example.
    rest_idx, random_idx = _carve(len(piece), args.fraction, args.seed)
    rest = [piece[i] for i in rest_idx]
    train_idx, sentence_idx, whole = phrases.sentence_split([s for s, _ in rest], args.fraction, args.seed)
    splits = {"train": [rest[i] for i in train_idx], "random": [piece[i] for i in random_idx],
              "sentences": [rest[i] for i in sentence_idx], "whole sentences only": [rest[i] for i in whole],
              "SST-2 validation": test_rows}
    words = {k: float(np.mean([len(s.split()) for s, _ in v])) for k, v in splits.items()}
    print(f"{len(piece)} examples of {args.sentences or (3000 if gpu else 1200)} sentences: "
          + ", ".join(f"{k} {len(v)} ({words[k]:.1f} words)" for k, v in splits.items())
          + f"; {device}; machine {common.machine()}")

    model = common.minilm()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    encoded = {k: common.text_split(tokenizer, v) for k, v in splits.items()}
    data = PreparedData(encoded["train"], encoded["random"], None, 2)
    rng = random.Random(args.seed)
    depths = [1, 2, 4, 6] if gpu else [1, 2, 3]  # a CPU trains the top blocks only, to finish in minutes
    trials = [{"learning_rate": 10 ** rng.uniform(-5, -3), "unfreeze_depth": rng.choice(depths)}
              for _ in range(args.trials or (12 if gpu else 6))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, params in enumerate(trials):
            torch.manual_seed(k)
            adapter = TextClassifier(str(model)).build(2, Path(tmp))
            settings = LoopSettings(epochs=args.epochs, metric="accuracy", direction="maximize", device=torch.device(device),
                                    seed=k, evals_per_epoch=1)
            train(adapter, data, Hyper(batch_size=32, **params), settings)
            scores = {name: evaluate(adapter, encoded[name], torch.device(device), True, 2)["accuracy"]
                      for name in ("random", "sentences", "whole sentences only", "SST-2 validation")}
            results.append({**params, **scores})
            print(f"  trial {k}: lr {params['learning_rate']:.2e} depth {params['unfreeze_depth']}  "
                  + "  ".join(f"{n} {v:.3f}" for n, v in scores.items()), flush=True)
            prefix.clear()
    test = [r["SST-2 validation"] for r in results]
    rows = []
    for name in ("random", "sentences", "whole sentences only"):
        values = [r[name] for r in results]
        picked = max(range(len(results)), key=lambda i: values[i])
        rows.append({"validation split": name, "examples": len(splits[name]),
                     "mean gap to SST-2 validation": float(np.mean(values) - np.mean(test)),
                     "rank correlation": spearman(values, test),
                     "SST-2 validation of its pick": test[picked]})
    print()
    print(common.table(rows, list(rows[0])))
    print(f"best trial on SST-2 validation itself: {max(test):.3f}")
    common.finish(args, {"machine": common.machine(), "device": device, "sizes": {k: len(v) for k, v in splits.items()},
                         "trials": results, "rows": rows})


if __name__ == "__main__":
    main()
