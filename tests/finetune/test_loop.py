from __future__ import annotations

import pytest
import torch

from sweeper.finetune.loop import (
    Hooks,
    Hyper,
    LoopSettings,
    NonFiniteLoss,
    Preempted,
    TrainState,
    learning_rate_factor,
    train,
)
from sweeper.finetune.model_specs import TinyTextClassifier

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("finetune_loop")

SPEC = TinyTextClassifier(layers=2, hidden=32, heads=2)


@pytest.fixture(scope="module")
def data(synthetic_data):  # type: ignore[no-untyped-def]
    return synthetic_data(600, 100)


def _settings(**kw) -> LoopSettings:  # type: ignore[no-untyped-def]
    base = dict(epochs=2, metric="accuracy", direction="maximize", device=torch.device("cpu"), seed=7,
                evals_per_epoch=2, pretrain_loss="l2sp")
    return LoopSettings(**{**base, **kw})


def test_training_learns_the_task(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    result = train(tiny_model(SPEC), data, Hyper(learning_rate=3e-3, batch_size=16), _settings(epochs=3))
    assert len(result.history) == 6
    assert result.best_value > 0.65  # the majority class is about 0.53
    assert result.best_value == max(v for _, v in result.history)
    assert result.steps == 3 * 30


class _StopAfter(Hooks):
    def __init__(self, evaluations: int) -> None:
        self.evaluations, self.seen, self.state = evaluations, 0, None

    def evaluated(self, evaluation, value, all_metrics, improved, snapshot) -> None:  # type: ignore[no-untyped-def]
        self.seen = evaluation

    def should_stop(self) -> bool:
        return self.seen >= self.evaluations

    def stopped(self, state: TrainState) -> None:
        self.state = state


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=2e-3, batch_size=16, unfreeze_depth=1, pretrain_loss_weight=0.5)
    whole = tiny_model(SPEC)
    full = train(whole, data, hyper, _settings())
    first = tiny_model(SPEC)
    hooks = _StopAfter(2)
    with pytest.raises(Preempted):
        train(first, data, hyper, _settings(), hooks)
    assert hooks.state is not None and hooks.state.step == 30
    second = tiny_model(SPEC)
    resumed = train(second, data, hyper, _settings(), resume=hooks.state)
    assert resumed.resumed_from_step == 30
    assert resumed.history == full.history
    for (name, a), (_, b) in zip(whole.named_parameters(), second.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_lambda_zero_trains_exactly_like_no_pretrain_loss(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=2e-3, batch_size=32, unfreeze_depth=2, pretrain_loss_weight=0.0)
    a, b = tiny_model(SPEC), tiny_model(SPEC)
    train(a, data, hyper, _settings(epochs=1, pretrain_loss="distill"))
    train(b, data, hyper, _settings(epochs=1, pretrain_loss="none"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_only_trainable_parameters_change(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    adapter = tiny_model(SPEC)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    train(adapter, data, Hyper(learning_rate=1e-3, batch_size=32, unfreeze_depth=1, weight_decay=0.1),
          _settings(epochs=1, pretrain_loss="distill"))
    changed = {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])}
    assert any(".layer.1." in n for n in changed)
    assert not any(".layer.0." in n or "embeddings" in n for n in changed)
    assert any("classifier" in n for n in changed)


def test_a_diverging_trial_stops_with_the_reason(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NonFiniteLoss, match=r"the loss became (nan|inf).*learning_rate"):
        train(tiny_model(SPEC), data, Hyper(learning_rate=1e12, batch_size=32, max_grad_norm=0.0),
              _settings(epochs=2))


def test_a_deferred_check_reports_the_step_that_diverged(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    # The loss is checked every `check_every_steps` steps, not after each (no per-step wait for
    # the GPU); the error still names the first step whose loss was not finite.
    hyper = Hyper(learning_rate=1e12, batch_size=32, max_grad_norm=0.0)
    messages = []
    for every in (1, 16):
        with pytest.raises(NonFiniteLoss) as caught:
            train(tiny_model(SPEC), data, hyper, _settings(epochs=2, check_every_steps=every))
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


def test_prefetching_batches_on_a_thread_changes_nothing(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    hyper = Hyper(learning_rate=2e-3, batch_size=16, unfreeze_depth=1, pretrain_loss_weight=0.5)
    a, b = tiny_model(SPEC), tiny_model(SPEC)
    first = train(a, data, hyper, _settings(epochs=1, prefetch=False, cache_prefix=False))
    second = train(b, data, hyper, _settings(epochs=1, prefetch=True, cache_prefix=False))
    assert first.history == second.history
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_training_and_evaluation_never_let_attention_run_on_cudnn(data, tiny_model) -> None:  # type: ignore[no-untyped-def]
    # cuDNN's attention plans every new batch shape anew, and bucketed batches have many
    # shapes: on an H100 it held the loop to a fifth of its speed (bench/README.md). The
    # backend flags are process-wide, so they are read where attention runs: inside a block.
    adapter = tiny_model(SPEC)
    seen: list[bool] = []
    adapter.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    train(adapter, data, Hyper(learning_rate=2e-3, batch_size=16), _settings(epochs=1, evals_per_epoch=1))
    assert seen and not any(seen)  # training steps and the evaluation alike
    assert torch.backends.cuda.cudnn_sdp_enabled()  # given back as it was once the trial ends


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (6, 100), (10, 10)])
def test_the_schedule_warms_up_from_the_first_step_then_decays_as_transformers_does(warmup: int, total: int) -> None:
    # Why sweeper keeps its own schedule: transformers' linear one gives the first step a
    # learning rate of 0. Read step by step off a real optimizer, as the loop's scheduler is.
    from transformers import get_linear_schedule_with_warmup

    rates = {}
    for name in ("ours", "transformers"):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, warmup, total))
                     if name == "ours" else get_linear_schedule_with_warmup(optimizer, warmup, total))
        rates[name] = []
        for _ in range(total):
            rates[name].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    ours, theirs = rates["ours"], rates["transformers"]
    assert ours[:warmup] == [(s + 1) / (warmup + 1) for s in range(warmup)]  # 1. warmup, from the first step
    assert theirs[:warmup] == [s / warmup for s in range(warmup)]  # theirs: 0 at the first step
    assert ours[warmup:] == theirs[warmup:]  # 2. decay: the same, to the last bit
    if warmup < total:  # the peak, and the last step's share just above 0
        assert ours[warmup] == 1.0 and ours[-1] == 1 / (total - warmup)
