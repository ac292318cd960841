"""``compile=True``: the trainable blocks through torch.compile give what the eager loop gives.

The tests trace with the ``aot_eager`` backend (dynamo's graph capture and AOT autograd's
forward and backward graphs, run by eager kernels): the same capture the real compiler
starts from, in seconds instead of the half-minute that code generation takes on two cores.
``bench/throughput.py`` runs the real compiler (inductor) here and on the GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from sweeper.finetune import compiled
from sweeper.finetune.data import prepare, training_batches
from sweeper.finetune.loop import Hyper, LoopSettings, train
from sweeper.finetune.model_specs import TinyTextClassifier

pytestmark = pytest.mark.xdist_group("finetune_compiled")

SPEC = TinyTextClassifier(layers=2, hidden=32, heads=2)


@pytest.fixture(scope="module")
def data(synthetic_data):  # type: ignore[no-untyped-def]
    return synthetic_data(400, 100)


def _settings(**kw) -> LoopSettings:  # type: ignore[no-untyped-def]
    base = dict(epochs=1, metric="accuracy", direction="maximize", device=torch.device("cpu"), seed=3,
                evals_per_epoch=2, pretrain_loss="l2sp")
    return LoopSettings(**{**base, **kw})


@pytest.fixture
def model(tiny_model):  # type: ignore[no-untyped-def]
    return lambda: tiny_model(SPEC, dropout=0.0)  # dropout's draws are the compiler's own


@pytest.mark.parametrize("depth", [None, 1])  # full fine-tuning; the top block over the cached prefix
def test_a_compiled_trial_trains_like_an_eager_one(data, model, depth: int | None) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=2e-3, batch_size=16, unfreeze_depth=depth, pretrain_loss_weight=0.5)
    eager_model, compiled_model = model(), model()
    eager = train(eager_model, data, hyper, _settings())
    graphs = compiled.compiled_graphs()
    fast = train(compiled_model, data, hyper, _settings(compile=True, compile_backend="aot_eager"))
    assert compiled.compiled_graphs() > graphs or depth == 1  # the second test reuses the first's graph
    assert [e for e, _ in fast.history] == [e for e, _ in eager.history]
    assert [v for _, v in fast.history] == pytest.approx([v for _, v in eager.history], abs=0.02)
    for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(p, q, atol=1e-4, rtol=1e-3), name
    assert fast.steps == eager.steps


def test_one_graph_serves_every_batch_shape_and_every_trial(data, model) -> None:  # type: ignore[no-untyped-def]
    shapes = {(len(b), int(data.train.lengths()[b].max())) for b in training_batches(data.train.lengths(), 16, seed=0)}
    assert len(shapes) >= 5  # length buckets and the short last batch: many shapes
    before = compiled.compiled_graphs()
    for seed in (11, 12):  # a second trial in the same process compiles nothing
        train(model(), data, Hyper(learning_rate=1e-3, batch_size=16),
              _settings(seed=seed, compile=True, compile_backend="aot_eager", evals_per_epoch=1))
    assert compiled.compiled_graphs() - before <= 1  # none if the first test's graph is still there


def test_every_dropout_rate_compiles_its_own_graph_and_the_limit_leaves_room(model) -> None:  # type: ignore[no-untyped-def]
    # A dropout rate is a constant of the block's graph: a study searching it makes one graph
    # per value, and past dynamo's default limit (8 graphs) blocks would run eagerly unnoticed.
    adapter = model()
    adapter.train()
    call = compiled.block_call(adapter, "aot_eager")
    assert torch._dynamo.config.recompile_limit >= compiled.RECOMPILE_LIMIT > 8
    block = adapter.blocks[-1]
    before = compiled.compiled_graphs()
    for k, rate in enumerate([0.01, 0.02]):
        for module in block.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = rate
        hidden = torch.randn(4, 6 + k, 32, requires_grad=True)
        mask = torch.ones(4, 1, 6 + k, 6 + k, dtype=torch.bool)
        call(block, hidden, (mask, None)).sum().backward()
        assert hidden.grad is not None
    assert compiled.compiled_graphs() - before == 2


def _broken_compiler(graph, example_inputs):  # type: ignore[no-untyped-def]
    raise RuntimeError("Compiler: cc not found")  # what inductor says on a machine without a C compiler


def test_a_compiler_that_cannot_run_leaves_the_trial_eager_with_one_warning(data, model, caplog) -> None:  # type: ignore[no-untyped-def]
    torch._dynamo.reset()  # the graphs of earlier tests would spare the backend its call
    torch._dynamo.register_backend(_broken_compiler, name="sweeper_test_broken")
    hyper = Hyper(learning_rate=2e-3, batch_size=16)
    eager = train(model(), data, hyper, _settings())
    with caplog.at_level(logging.WARNING, logger="sweeper.finetune.compiled"):
        fallen_back = train(model(), data, hyper,
                            _settings(compile=True, compile_backend="sweeper_test_broken"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "sweeper.finetune.compiled"]
    assert len(warnings) == 1 and "cc not found" in warnings[0] and "compile=False" in warnings[0]
    assert fallen_back.history == eager.history  # eager from the first block on: nothing computed twice


def test_a_compiled_resnet_trains_like_an_eager_one(tmp_path: Path, image_folder) -> None:  # type: ignore[no-untyped-def]
    from sweeper.finetune.data import ImageData
    from sweeper.finetune.model_specs import ImageClassifier

    folder = image_folder(12)
    images = prepare(ImageData(str(folder), image_size=32, validation_fraction=0.25), tmp_path / "cache", seed=0)
    hyper = Hyper(learning_rate=1e-3, batch_size=5, unfreeze_depth=5)  # a short last batch; blocks of 3 stages
    nets = []
    for compile_blocks in (False, True):
        torch.manual_seed(0)
        nets.append(ImageClassifier("resnet18", weights="none").build(images.num_labels, tmp_path))
        graphs = compiled.compiled_graphs()
        result = train(nets[-1], images, hyper, _settings(evals_per_epoch=1, compile=compile_blocks,
                                                          compile_backend="aot_eager"))
        assert len(result.history) == 1
    # One graph per distinct block (5 here), below dynamo's recompile limit of 8 at which a
    # block would silently run eagerly again.
    assert 0 < compiled.compiled_graphs() - graphs < 8
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.allclose(p, q, atol=1e-4, rtol=1e-3), name
    for (name, b), c in zip(nets[0].model.named_buffers(), nets[1].model.buffers()):  # batch-norm statistics
        assert torch.allclose(b.float(), c.float(), atol=1e-4, rtol=1e-3), name
