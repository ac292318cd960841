"""What every benchmark script shares: where the model and data are, the machine, the output.

The scripts run from the project root (``python bench/throughput.py``), on a CPU here and on
a GPU machine prepared as ``/work/shared/gpu/README.md`` says: there the offline model and
SST-2 are in ``.gpu/`` (``../shared/gpu/prep.sh`` copies them), here in ``../shared/``.
Every script prints its figures and ratios, and with ``--json FILE`` writes them too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))


def shared(*parts: str) -> Path:
    """``.gpu/<parts>`` where prep.sh made it (the GPU machine), else ``../shared/<parts>``."""
    local = ROOT / ".gpu" / Path(*parts)
    return local if local.exists() else ROOT.parent / "shared" / Path(*parts)


def minilm() -> Path:
    return shared("models", "minilm-l6-h384")


def sst2() -> Path:
    return shared("data", "sst2")


def device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda runs the GPU-sized benchmark, cpu the CPU-sized one (default: cuda if there is one)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process (default 1: with more threads than idle cores, "
                             "OpenMP's spinning barriers make a busy machine ten times slower)")


def resolve_device(choice: str, threads: int | None = None) -> str:
    import torch

    if threads:
        torch.set_num_threads(threads)
        os.environ["SWEEPER_THREADS"] = str(threads)  # for worker processes a script starts
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here")
    return choice


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def read_sst2(split: str, limit: int | None = None, seed: int | None = None) -> list[tuple[str, int]]:
    """(sentence, label) rows of an SST-2 TSV file; shuffled with ``seed`` before ``limit``."""
    with open(sst2() / f"{split}.tsv", newline="", encoding="utf-8") as handle:
        rows = [(r["sentence"], int(r["label"]))
                for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


def write_tsv(folder: Path, split: str, rows: Sequence[tuple[str, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.tsv", "w", newline="", encoding="utf-8") as handle:
        handle.write("sentence\tlabel\n")
        handle.writelines(f"{sentence}\t{label}\n" for sentence, label in rows)


def text_split(tokenizer: Any, rows: Sequence[tuple[str, int]], max_length: int = 128) -> Any:
    """A sweeper ``TextSplit`` of ``rows`` tokenised exactly as Hugging Face examples are."""
    import numpy as np

    from sweeper.finetune.data import TextSplit

    encoded = tokenizer([s for s, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in encoded], out=offsets[1:])
    flat = np.fromiter((t for x in encoded for t in x), dtype=np.int32, count=int(offsets[-1]))
    return TextSplit(flat, offsets, np.array([y for _, y in rows], dtype=np.int64), int(tokenizer.pad_token_id))


def random_bert(folder: Path, tokenizer_from: Path, *, layers: int = 12, hidden: int = 768,
                heads: int = 12, seed: int = 0) -> Path:
    """A BERT with random weights (BERT-base shape by default) saved with MiniLM's tokenizer
    (the same uncased WordPiece vocabulary), so every contender loads it from one folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(folder)
    return folder


def training_arguments(warmup: float = 0.0, **kwargs: Any) -> Any:
    """``TrainingArguments`` across transformers 5.x: the GPU machine has 5.17, this one 5.23
    (a warmup share is ``warmup_ratio`` in some releases and a fractional ``warmup_steps`` in
    others); arguments a release lacks are dropped rather than failing there."""
    import inspect

    from transformers import TrainingArguments

    accepted = inspect.signature(TrainingArguments).parameters
    if warmup:
        kwargs["warmup_ratio" if "warmup_ratio" in accepted else "warmup_steps"] = warmup
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in accepted})


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.WARNING)
    from sweeper.finetune.models import quiet_transformers

    quiet_transformers()


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table (what the README copies)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


def finish(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"figures written to {args.json}")
