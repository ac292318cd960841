"""Trial arrays (issue 21): K trials as one stacked model against K trials one after another.

    python bench/arrays.py --device cpu                        # tiny model, K = 1,2,4,8,16
    python bench/arrays.py --device cpu --models tiny,minilm   # and MiniLM-L6 on SST-2 rows
    python bench/arrays.py --device cuda --models minilm --trainer --packing 4   # the GPU step

For each K, K trials of one structure (one unfreeze depth and batch size; learning rate,
weight decay, λ and warmup spread) train

- *sequential*: one after another with ``loop.train`` in this process, the frozen-prefix
  cache shared between them as a worker shares it: the baseline, measured in the same run;
- *array*: together, as one ``TrialArray`` (``sweeper/finetune/arrays.py``);
- with ``--packing K``: in K worker processes on one device (``bench/packing.py``'s sweeper
  side), and with ``--trainer``: one at a time with Hugging Face ``Trainer`` padded to 128
  (``bench/packing.py``'s baseline).

Figures: trial-epochs per hour (wall clock, evaluation included), and operator launches per
trial-step, counted with ``torch.profiler`` on a separate short run (one epoch of a few
batches) so that the profiler's cost stays off the clock: every ``aten::`` operator that
does work (no ``aten::`` operator below it, and not a view), which is what a GPU is asked to
launch, and the same on any hardware. ``--engines`` also counts, for the trainable top's
forward and backward alone, the hand-written stacked layers against ``torch.func`` (``vmap``
of ``functional_call`` over ``stack_module_state``): the measurement behind the choice.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

# Operators that only describe a tensor anew (no kernel runs): not counted as launches.
VIEWS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::expand", "aten::transpose",
    "aten::t", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select",
    "aten::alias", "aten::detach", "aten::empty", "aten::empty_strided", "aten::lift_fresh", "aten::unbind",
    "aten::split", "aten::chunk", "aten::narrow", "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg",
    "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::set_",
    "aten::empty_like", "aten::contiguous", "aten::view_as", "aten::expand_as", "aten::numpy_T",
    # a `.to()` to where the tensor already is returns it (one that copies has `aten::copy_`
    # below it); allocation and metadata
    "aten::to", "aten::resize_", "aten::detach_", "aten::_has_compatible_shallow_copy_type",
}


def launches(run: Callable[[], Any]) -> int:
    """Operators ``run`` launches: in each tree of ``aten::`` calls, the innermost ones that
    are not views (an ``aten::linear`` counts as its one ``addmm``; a view counts nothing)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()

    def work(event: Any) -> int:
        below = sum(work(child) for child in event.cpu_children)
        if below:
            return below
        return int(event.name.startswith("aten::") and event.name not in VIEWS)

    return sum(work(e) for e in prof.events() if e.cpu_parent is None)


class Setup:
    """A model and data: ``build(seed)`` is a trial's adapter (its head drawn after its seed)."""

    def __init__(self, name: str, data: Any, build: Callable[[int], Any], depth: int, batch_size: int,
                 rates: tuple[float, float]) -> None:
        self.name, self.data, self.build, self.depth, self.batch_size = name, data, build, depth, batch_size
        self.rates = rates


def tiny(args: argparse.Namespace, cache: Path) -> Setup:
    """The quickstart's model (``TinyTextClassifier(layers=2, hidden=64, heads=2)``) on
    ``SyntheticText``, at depth 1 (one frozen block: the array shares it)."""
    import torch

    from sweeper.finetune.data import SyntheticText, prepare
    from sweeper.finetune.model_specs import TinyTextClassifier

    spec = TinyTextClassifier(layers=2, hidden=64, heads=2)
    data = prepare(SyntheticText(n_train=args.tiny_samples, n_test=200), cache, 0, spec.tokenizer(cache), "tiny")

    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        return spec.build(2, cache, 0.0)

    return Setup("tiny (quickstart)", data, build, 1, 32, (8e-4, 3e-3))


def minilm(args: argparse.Namespace, cache: Path) -> Setup:
    """MiniLM-L6 on ``--samples`` SST-2 sentences, at depth ``--depth`` of 6."""
    import torch
    from transformers import AutoTokenizer

    from sweeper.finetune.data import PreparedData
    from sweeper.finetune.model_specs import TextClassifier

    tokenizer = AutoTokenizer.from_pretrained(str(common.minilm()))
    rows = common.read_sst2("train", args.samples, seed=0)
    valid = common.read_sst2("validation", args.eval_samples)
    data = PreparedData(common.text_split(tokenizer, rows), common.text_split(tokenizer, valid), None, 2)
    spec = TextClassifier(str(common.minilm()))

    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        return spec.build(2, cache, 0.0)

    return Setup("MiniLM-L6, SST-2", data, build, args.depth, 32, (2e-5, 2e-4))


def hypers(setup: Setup, k: int) -> list[Any]:
    """K trials of one structure, spread over everything else a member has of its own."""
    from sweeper.finetune.loop import Hyper

    low, high = setup.rates
    out = []
    for i in range(k):
        share = i / max(1, k - 1)
        out.append(Hyper(learning_rate=low * (high / low) ** share, weight_decay=0.01 * (i % 3),
                         pretrain_loss_weight=1e-3 * (i % 2), warmup_ratio=0.06 * (i % 4), dropout=0.0,
                         unfreeze_depth=setup.depth, batch_size=setup.batch_size))
    return out


def settings(device: str, epochs: float, seed: int = 0) -> Any:
    import torch

    from sweeper.finetune.loop import LoopSettings

    return LoopSettings(epochs=epochs, metric="accuracy", direction="maximize", device=torch.device(device),
                        seed=seed, batch_seed=0, pretrain_loss="l2sp", log_every_seconds=1e9)


def sequential(setup: Setup, k: int, device: str, epochs: float, data: Any = None,
               built: list[Any] | None = None) -> Callable[[], None]:
    """K trials one after another; with ``built``, on adapters built beforehand (what the
    launch count measures: training, not building models)."""
    from dataclasses import replace

    from sweeper.finetune.loop import train

    def run() -> None:
        for i, hyper in enumerate(hypers(setup, k)):
            adapter = built[i] if built else setup.build(i)
            train(adapter, data or setup.data, hyper, replace(settings(device, epochs), seed=i))

    return run


def array(setup: Setup, k: int, device: str, epochs: float, data: Any = None,
          built: list[Any] | None = None) -> Callable[[], None]:
    """The same K trials as one ``TrialArray``."""
    from sweeper.finetune.arrays import Member, Structure, TrialArray

    def run() -> None:
        trials = TrialArray(data or setup.data, settings(device, epochs), Structure(setup.depth, setup.batch_size))
        for i, hyper in enumerate(hypers(setup, k)):
            trials.add(Member(i, built[i] if built else setup.build(i), hyper, i))
        trials.run()

    return run


def timed(run: Callable[[], None], device: str) -> float:
    import torch

    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def short(data: Any, batches: int, batch_size: int) -> Any:
    """``data`` cut to ``batches`` training batches and one validation batch: what the
    launch count runs on."""
    import numpy as np

    from sweeper.finetune.data import PreparedData

    return PreparedData(data.train.subset(np.arange(batches * batch_size)),
                        data.validation.subset(np.arange(min(64, len(data.validation)))), None, data.num_labels)


def one_model(setup: Setup, args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    import math

    rows = []
    # One epoch of 32 batches with its evaluation (64 examples): about as many steps to an
    # evaluation as the quickstart's trials have (63 a epoch, two evaluations an epoch).
    steps = min(32, len(setup.data.train) // setup.batch_size)
    small = short(setup.data, steps, setup.batch_size)
    alone = launches(sequential(setup, 1, device, 1.0, small, [setup.build(0)])) / steps
    steps_per_epoch = math.ceil(len(setup.data.train) / setup.batch_size)
    # Off the clock: one trial fills the frozen-prefix cache, which then serves both sides as
    # it serves every later trial of a worker (else the first timed run alone would pay it).
    sequential(setup, 1, device, args.epochs)()
    for k in args.k:
        wall_seq = timed(sequential(setup, k, device, args.epochs), device)
        wall_arr = timed(array(setup, k, device, args.epochs), device)
        stacked = launches(array(setup, k, device, 1.0, small, [setup.build(i) for i in range(k)])) / (steps * k)
        per_hour_seq = k * args.epochs / wall_seq * 3600
        per_hour_arr = k * args.epochs / wall_arr * 3600
        rows.append({"model": setup.name, "K": k, "sequential_s": wall_seq, "array_s": wall_arr,
                     "trial-epochs/h seq": per_hour_seq, "trial-epochs/h array": per_hour_arr,
                     "x sequential": per_hour_arr / per_hour_seq,
                     "launches/trial-step seq": alone, "launches/trial-step array": stacked,
                     "launch ratio": stacked / alone, "steps/epoch": steps_per_epoch})
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def engines(setup: Setup, k: int) -> list[dict[str, Any]]:
    """Forward and backward of the trainable top (one block and the head), per trial-step:
    one trial's Hugging Face modules, the hand-written stacked layers, and ``torch.func``."""
    import torch
    from torch.func import functional_call, stack_module_state, vmap

    from sweeper.finetune import array_layers, freeze

    adapters = [setup.build(i) for i in range(k)]
    start = freeze.first_trainable_block(setup.depth, adapters[0].num_blocks)
    batch = setup.data.train.batch(__import__("numpy").arange(setup.batch_size), torch.device("cpu"))
    with torch.no_grad():
        hidden, context = adapters[0].embed(batch)
        hidden = adapters[0].run(hidden, context, adapters[0].blocks[:start])

    class Top(torch.nn.Module):
        def __init__(self, adapter: Any) -> None:
            super().__init__()
            self.adapter = adapter
            self.blocks = adapter.blocks[start:]
            self.heads = torch.nn.ModuleList(adapter.head_modules)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.adapter.head(self.adapter.run(hidden, context, self.blocks), context)

    tops = [Top(a) for a in adapters]
    for top in tops:
        top.train()

    def one() -> None:
        tops[0](hidden).sum().backward()

    params, buffers = stack_module_state(tops)  # type: ignore[arg-type]
    base = copy.deepcopy(tops[0]).to("meta")

    def call(p: Any, b: Any, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    def func() -> None:
        vmap(call, in_dims=(0, 0, None), randomness="different")(params, buffers, hidden).sum().backward()

    names = {id(p): n for n, p in adapters[0].model.named_parameters()}
    plan = array_layers.text_plan(adapters[0], start)
    stacked = {names[id(p)]: torch.stack([dict(a.model.named_parameters())[names[id(p)]].detach() for a in adapters])
               .requires_grad_(True) for p in freeze.apply(adapters[0], setup.depth)}
    noise = array_layers.Noise([0.0] * k, [0.0] * k, [0.0] * k, [], training=False)

    def hand() -> None:
        array_layers.forward(plan, stacked, hidden, batch, context[0], noise).sum().backward()

    one(), func(), hand()  # warm: first calls build caches
    rows = []
    for label, run, members in (("one trial, HF modules", one, 1), (f"torch.func vmap, K={k}", func, k),
                                (f"hand-written stacked, K={k}", hand, k)):
        wall = min(timed(run, "cpu") for _ in range(5))
        rows.append({"engine": label, "launches/trial-step": launches(run) / members,
                     "ms/trial-step": 1000 * wall / members})
    return rows


def gpu_contenders(args: argparse.Namespace, setup: Setup, device: str) -> list[dict[str, Any]]:
    """The array against ``Trainer`` padded to 128 and against K worker processes, on the
    same trials (bench/packing.py's two contenders; its trial list, one depth for all)."""
    import packing

    k = max(args.k)
    trials = [{"depth": setup.depth, "learning_rate": h.learning_rate} for h in hypers(setup, k)]
    rows = []
    if args.trainer:
        rows.append({"contender": "Trainer, one at a time, padded to 128", **packing.run_trainer(trials, args, device)})
    if args.packing:
        rows.append({"contender": f"sweeper, {args.packing} worker processes",
                     **packing.run_sweeper(args.packing, trials, args, device)})
    wall = timed(array(setup, k, device, args.epochs), device)
    rows.append({"contender": f"sweeper, one array of {k}", "wall_s": wall, "trial_epochs": k * args.epochs})
    for row in rows:
        row["trial-epochs/GPU-hour"] = row["trial_epochs"] / (row["wall_s"] / 3600)
        row["x first"] = row["trial-epochs/GPU-hour"] / rows[0]["trial-epochs/GPU-hour"]
    print(common.table(rows, ["contender", "wall_s", "trial_epochs", "trial-epochs/GPU-hour", "x first"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.device_arg(parser)
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, minilm (default tiny)")
    parser.add_argument("--k", default="1,2,4,8,16", help="array sizes (default 1,2,4,8,16)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 1)")
    parser.add_argument("--tiny-samples", type=int, default=2000, help="SyntheticText training rows (default 2,000, the quickstart's)")
    parser.add_argument("--samples", type=int, default=None, help="SST-2 training sentences (default 256 on cpu, 4,000 on cuda)")
    parser.add_argument("--eval-samples", type=int, default=None, help="SST-2 validation sentences (default 128 on cpu, all on cuda)")
    parser.add_argument("--depth", type=int, default=2, help="MiniLM's unfreeze depth of 6 (default 2)")
    parser.add_argument("--engines", action="store_true", help="also count hand-written stacked layers against torch.func")
    parser.add_argument("--trainer", action="store_true", help="also Trainer one at a time, padded to 128 (bench/packing.py)")
    parser.add_argument("--packing", type=int, default=0, help="also this many worker processes on one device (bench/packing.py)")
    parser.add_argument("--contenders-only", action="store_true",
                        help="only the array of max(K) against --trainer / --packing, not the sequential sweep over K")
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # packing.run_sweeper reads it
    args = parser.parse_args()
    device = common.resolve_device(args.device, args.threads)
    common.quiet()
    gpu = device == "cuda"
    args.k = [int(k) for k in args.k.split(",")]
    args.epochs = args.epochs or 1
    args.samples = args.samples or (4000 if gpu else 256)
    args.eval_samples = args.eval_samples or (None if gpu else 128)
    print(f"K = {args.k}, {args.epochs} epoch(s) a trial, {device}; machine {common.machine()}", flush=True)
    result: dict[str, Any] = {"machine": common.machine(), "device": device, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {"tiny": tiny, "minilm": minilm}
        for name in args.models.split(","):
            setup = setups[name](args, Path(tmp))
            if not args.contenders_only:
                result[name] = one_model(setup, args, device)
            if args.engines:
                result[name + "_engines"] = engines(setup, 8)
                print(common.table(result[name + "_engines"], list(result[name + "_engines"][0])))
            if args.trainer or args.packing:
                result[name + "_gpu"] = gpu_contenders(args, setup, device)
    common.finish(args, result)


if __name__ == "__main__":
    main()
