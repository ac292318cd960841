"""``head_init="probe"`` (issue 19): every trial's new head starts from one linear probe of the
pretrained features, fitted once per study and shared by every worker through the store."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from sweeper import budget, checkpoints, head_probe, record
from sweeper import space as space_mod
from sweeper.errors import SweepError
from sweeper.finetune import probe
from sweeper.objective import Objective
from sweeper.outcome import WorkerInfo
from sweeper.storage import open_storage
from sweeper.study import load as load_sweep
from sweeper.worker import claim
from tests.helpers import TINY_STUDY, write_study


def test_the_probe_fits_a_separable_problem_and_is_the_same_every_time() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 12, generator=generator)
    labels = (features[:, 3] - 0.5 * features[:, 7] > 0).long()
    weight, bias = probe.fit_probe(features, labels, 2)
    again = probe.fit_probe(features, labels, 2)
    assert torch.equal(weight, again[0]) and torch.equal(bias, again[1])
    assert probe.probe_accuracy(features, labels, weight, bias) > 0.97
    untrained = probe.probe_accuracy(features, labels, torch.zeros_like(weight), torch.zeros_like(bias))
    assert untrained < 0.7, "zeros predict one class: the fit is what separates them"


def test_a_probe_of_another_shape_is_refused_with_one_line() -> None:
    layer = torch.nn.Linear(8, 2)
    with pytest.raises(SweepError, match="a study keeps one model"):
        probe.load_probe(layer, torch.zeros(3, 8), torch.zeros(3))


def _two_workers(tmp_path: Path) -> tuple[optuna.Study, Objective, Objective]:
    """A tiny study with ``head_init="probe"`` on SQLite, and two workers' objectives on it."""
    body = TINY_STUDY.replace("n_trials=4,", 'n_trials=4, head_init="probe", pruner="none",')
    sweep = load_sweep(str(write_study(tmp_path, body)), [])
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=None, grace_period=None)
    study = optuna.create_study(study_name=sweep.name, storage=storage, direction=record.direction_of(sweep.direction))
    first, _ = space_mod.first_trial_params(sweep.space, sweep.first_trials)
    budget.ensure_tickets(study, sweep.n_trials, first)
    store = checkpoints.open_store(None, sweep.output_path)
    return study, Objective(sweep, study, WorkerInfo(0), store), Objective(sweep, study, WorkerInfo(1), store)


def test_every_trial_of_every_worker_starts_from_the_one_probe_of_the_pretrained_features(tmp_path: Path) -> None:
    study, one, other = _two_workers(tmp_path)
    heads = []
    for objective in (one, other, one):
        trial = claim(study)
        assert trial is not None
        prepared = objective.prepare(trial)
        heads.append({k: v.clone() for k, v in probe.last_linear(prepared.adapter, 2).state_dict().items()})
    for head in heads[1:]:
        for name, tensor in heads[0].items():
            assert torch.equal(head[name], tensor), f"{name}: every trial starts from the same head"

    published = record.HEAD_PROBE.get(study)
    assert published is not None and published["examples"] == len(one.data().train), "the whole tiny training split"
    assert sorted(p.name for p in (one.sweep.output_path / "artifacts").glob("head-probe-*")) == [published["id"]]

    # The probe is the logistic regression of the pretrained model's features, as fitted afresh here.
    sweep, data = one.sweep, one.data()
    torch.manual_seed(0)
    adapter = sweep.model.build(data.num_labels, sweep.cache_dir, None, data.label_names)
    layer = probe.last_linear(adapter, data.num_labels)
    drawn = probe.probe_order(len(data.train), sweep.seed)
    batches = (data.train.batch(drawn[i:i + probe.PROBE_BATCH], torch.device("cpu"))
               for i in range(0, len(drawn), probe.PROBE_BATCH))
    weight, bias = probe.fit_probe(*probe.head_features(adapter, layer, batches), data.num_labels)
    assert torch.allclose(heads[0]["weight"], weight, atol=1e-6) and torch.allclose(heads[0]["bias"], bias, atol=1e-6)
    assert not torch.allclose(layer.weight, weight), "the freshly built head is a random draw, not the probe"


def test_a_worker_that_fitted_a_probe_too_late_takes_the_published_one(tmp_path: Path) -> None:
    study, _, _ = _two_workers(tmp_path)
    first = {"id": "head-probe-first", "examples": 1, "accuracy": 0.5, "seconds": 0.0}
    second = {"id": "head-probe-second", "examples": 1, "accuracy": 0.5, "seconds": 0.0}
    assert head_probe._publish(study, first) == first
    assert head_probe._publish(study, second) == first, "the first to publish wins"
    assert record.HEAD_PROBE.get(study) == first


def test_a_resnets_probe_is_fitted_to_what_its_fc_layer_sees() -> None:
    import torchvision

    from sweeper.finetune.models import ResNetAdapter

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    adapter = ResNetAdapter(model, "resnet18")
    layer = probe.last_linear(adapter, 3)
    assert layer is model.fc
    images = torch.randn(12, 3, 32, 32)
    batch = {"pixel_values": images, "labels": torch.tensor([0, 1, 2] * 4)}
    features, labels = probe.head_features(adapter.train(), layer, [batch])
    assert adapter.model.training, "its training mode is given back"
    with torch.no_grad():
        model.eval()
        expected = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(images))))))))), 1)
    assert torch.allclose(features, expected, atol=1e-5), "features of the model in evaluation mode"
    assert torch.equal(labels, batch["labels"])
    weight, bias = probe.fit_probe(features, labels, 3)
    probe.load_probe(layer, weight, bias)
    assert torch.equal(model.fc.weight, weight) and torch.equal(model.fc.bias, bias)


def test_a_probe_gone_from_the_store_is_one_line_that_says_where_it_was(tmp_path: Path) -> None:
    study, one, _ = _two_workers(tmp_path)
    record.HEAD_PROBE.set(study, {"id": "head-probe-gone", "examples": 1, "accuracy": 0.5, "seconds": 0.0})
    trial = claim(study)
    assert trial is not None
    with pytest.raises(checkpoints.StoreError) as caught:
        one.prepare(trial)
    message = str(caught.value)
    assert message.startswith("cannot read the study's head probe head-probe-gone (") and "\n" not in message
    assert "artifact store the sweep was launched with" in message
