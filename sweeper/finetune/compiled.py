"""The trainable blocks through ``torch.compile``: a study's ``compile=True``.

Why: on a GPU a small encoder at batch 32 is bound by the host, not the device. On an H100
sweeper's eager loop spent about 19 ms of host time a step launching some 600 kernels and
230 dtype copies, for 2.9 ms of GPU work (bench/README.md, throughput). The compiler fuses
the elementwise work of a block (bias, GELU, dropout, residual, layer norm, autocast's
casts) into a few kernels, forward and backward, and launches them from generated code.

What is compiled: one plain function that runs one block (the adapter's ``call_block``),
so blocks of one shape share one compiled graph, parameters being graph inputs (every layer
of a BERT-family encoder; a ResNet's blocks, stage by stage), and the batch and sequence
dimensions are marked dynamic, so one graph serves every length bucket and the short last
batch. A later trial in the same worker process compiles nothing new unless its constants
differ (below), and one in another process on the same machine finds the generated code in
the compiler's on-disk cache. Only the blocks that train run compiled: the frozen bottom
runs once per example (``prefix.py``), evaluation a few times a trial, the stem and the
head are a few kernels each; compiling them would cost more than it saves.

What makes a new graph: a block's constants. A dropout rate is one, so a study that
searches ``dropout`` compiles again for every new value (seconds with the compiler's cache
warm, tens of seconds cold): search a few values (``Categorical``) or leave it fixed.
Whether the block's input needs a gradient (the bottom block at full depth) is another, and
so is the model kind; the batch and sequence sizes are not.

What changes: float rounding (fused kernels round differently) and, with dropout, which
units are dropped (the compiler draws its own random numbers): a compiled trial is as
reproducible as an eager one from run to run on the same machine, but not equal to it.

If the compiler cannot run here (no C compiler on a CPU machine, no Triton on a GPU one),
the trial says so in one warning and runs eagerly: the setting is a speed-up, never a
reason for a trial to fail.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sweeper.finetune.models import BlockCall, ModelAdapter

logger = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager")  # the real compiler; tracing without code generation (tests)
# inductor's modes: None fuses kernels; "reduce-overhead" also replays them as CUDA graphs
# (one recording per batch shape; GPU only). The study's switch uses None; the bench both.
MODES = (None, "reduce-overhead")

RECOMPILE_LIMIT = 64  # graphs of the block function per process (dynamo's default: 8)

# One compiled function per (adapter class, backend, mode) and process: every trial reuses it.
_Key = tuple[type, str, str | None]
_compiled: dict[_Key, Any] = {}
_failed: set[_Key] = set()


def block_call(adapter: ModelAdapter, backend: str = "inductor", mode: str | None = None) -> BlockCall:
    """A drop-in for ``adapter.call_block`` that runs the block compiled."""
    key = (type(adapter), backend, mode)
    if key not in _compiled:
        _compiled[key] = torch.compile(type(adapter).call_block, backend=backend, mode=mode)
        # A block's dropout rates are constants of its graph, so every dropout value a study
        # tries is a graph of its own (x2: blocks whose input needs a gradient, and not).
        # Past dynamo's default of 8, blocks would quietly run eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled, eager = _compiled[key], adapter.call_block
    steady: list[Any] = [None, None]  # a step's context and its steady form: once for all blocks

    def call(block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        if key in _failed:
            return eager(block, hidden, context)
        if context is not steady[0]:
            steady[:] = [context, adapter.steady_context(hidden, context)]
        context = steady[1]
        for tensor, dims in adapter.varying_dims(hidden, context):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        try:
            return compiled(block, hidden, context)
        except torch._dynamo.exc.TorchDynamoException as exc:
            # Compilation happens before the block computes anything, so running it
            # eagerly now leaves the trial exactly where it was.
            _failed.add(key)
            logger.warning("torch.compile cannot run here (%s): this worker trains uncompiled; "
                           "set compile=False in the study to skip the attempt", _reason(exc))
            return eager(block, hidden, context)

    return call


def step_begins(mode: str | None) -> None:
    """Before each training step: with CUDA graphs, the last step's graph outputs are dead
    (their memory is reused by the next replay), which the graphs' allocator must be told."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def _reason(exc: BaseException) -> str:
    """The compiler's own complaint (a backend's error comes wrapped), on one line."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    text = " ".join(str(inner).split())
    return f"{type(inner).__name__}: {text}"[:300] if text else type(inner).__name__


def compiled_graphs() -> int:
    """Graphs the compiler has built in this process (tests: proof that it ran)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
