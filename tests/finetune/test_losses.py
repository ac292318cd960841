from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweeper.finetune import freeze, losses
from sweeper.finetune.loop import forward_pass
from sweeper.finetune.model_specs import TinyTextClassifier

SPEC = TinyTextClassifier(layers=3, hidden=32, heads=2)


@pytest.fixture
def setup(tiny_model, model_cache: Path):  # type: ignore[no-untyped-def]
    adapter = tiny_model(SPEC)
    tokenizer = SPEC.tokenizer(model_cache)
    encoded = tokenizer(["the film was good and witty", "not good", "dull and flat story"],
                        padding=True, return_tensors="pt")
    batch = dict(encoded) | {"labels": torch.tensor([1, 0, 0])}
    return adapter, tokenizer, batch


def _loss(name, adapter, tokenizer, batch, depth, model_cache):  # type: ignore[no-untyped-def]
    freeze.apply(adapter, depth)
    head = SPEC.pretrained_lm_head(model_cache) if name == "mlm" else None
    return losses.build(name, adapter, depth, lm_head=head, tokenizer=tokenizer, seed=0)


@pytest.mark.parametrize("name", ["l2sp", "distill"])
@pytest.mark.parametrize("depth", [1, 3])
def test_pretrain_term_is_zero_at_step_zero(setup, model_cache, name, depth) -> None:  # type: ignore[no-untyped-def]
    adapter, tokenizer, batch = setup
    term = _loss(name, adapter, tokenizer, batch, depth, model_cache)
    adapter.eval()
    start = freeze.first_trainable_block(depth, adapter.num_blocks)
    _, forward = forward_pass(adapter, batch, start)
    assert float(term(adapter, forward)) == pytest.approx(0.0, abs=1e-6)


def test_l2sp_is_the_relative_squared_drift(setup, model_cache) -> None:  # type: ignore[no-untyped-def]
    adapter, tokenizer, batch = setup
    term = _loss("l2sp", adapter, tokenizer, batch, 1, model_cache)
    params = list(freeze.pretrained_parameters(adapter, 1).values())
    norm = sum(float(p.detach().pow(2).sum()) for p in params)
    with torch.no_grad():
        for p in params:
            p.mul_(1.1)  # every weight moves by 10% of itself
    _, forward = forward_pass(adapter, batch, 2)
    assert float(term(adapter, forward)) == pytest.approx(0.01, rel=1e-4)
    assert norm > 0


def test_mlm_at_step_zero_equals_the_pretrained_models_own_mlm_loss(setup, model_cache) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForMaskedLM

    adapter, tokenizer, batch = setup
    term = _loss("mlm", adapter, tokenizer, batch, 2, model_cache)
    adapter.eval()
    _, forward = forward_pass(adapter, batch, 1)
    generator_state = term.generator.get_state()
    ours = float(term(adapter, forward))
    term.generator.set_state(generator_state)
    masked, labels = term.mask(batch["input_ids"], batch["attention_mask"])
    pretrained = AutoModelForMaskedLM.from_pretrained(SPEC.materialise(model_cache)).eval()
    with torch.no_grad():
        reference = float(pretrained(input_ids=masked, attention_mask=batch["attention_mask"], labels=labels).loss)
    assert ours == pytest.approx(reference, rel=1e-4)
    assert (labels != -100).any()


@pytest.mark.parametrize("name", ["l2sp", "distill", "mlm"])
def test_gradients_reach_only_the_trainable_parameters(setup, model_cache, name) -> None:  # type: ignore[no-untyped-def]
    adapter, tokenizer, batch = setup
    term = _loss(name, adapter, tokenizer, batch, 1, model_cache)
    trainable = {id(p) for p in adapter.parameters() if p.requires_grad}
    with torch.no_grad():  # move the trainable weights so every term has a gradient
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    freeze.set_train_mode(adapter, 1)
    logits, forward = forward_pass(adapter, batch, 2)
    loss = losses.task_loss(logits, batch["labels"]) + 0.5 * term(adapter, forward)
    loss.backward()
    for p in adapter.parameters():
        if id(p) in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None


def test_lambda_zero_gives_exactly_the_task_loss(setup, model_cache) -> None:  # type: ignore[no-untyped-def]
    adapter, tokenizer, batch = setup
    term = _loss("distill", adapter, tokenizer, batch, 2, model_cache)
    adapter.eval()
    logits, forward = forward_pass(adapter, batch, 1)
    task = losses.task_loss(logits, batch["labels"])
    assert torch.equal(task + 0.0 * term(adapter, forward), task)
