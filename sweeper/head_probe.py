"""One linear probe per study (``head_init="probe"``), shared by every worker and trial.

The first trial of each worker process finds the study's probe in the artifact store, through
the study's record (``record.HEAD_PROBE``), and the process keeps it; where there is none yet
it fits one (``finetune/probe.py``) on a seeded draw of the training split, writes it, and
publishes it under the ticket lock. Workers that start together may each fit one: the first to publish
wins, the others delete theirs and load the winner's, so every trial of the study starts from
the same head, whatever machine or device fitted it. The probe stays for the study's life
(a few kilobytes: classes × features).
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from typing import Any

import optuna

from sweeper import budget, checkpoints, optuna_adapter, record
from sweeper.checkpoints import StoreError

logger = logging.getLogger(__name__)


class StudyProbe:
    """The study's probe as one worker process holds it: read (or fitted and published) by its
    first trial, then loaded into each trial's head from memory, without the storage or the
    store on every trial."""

    def __init__(self, study: optuna.Study, store: Any, seed: int) -> None:
        self.study, self.store, self.seed = study, store, seed
        self._weights: tuple[Any, Any] | None = None

    def initialise(self, adapter: Any, split: Any, num_labels: int, device: Any) -> None:
        """Load the study's probe into ``adapter``'s head."""
        from sweeper.finetune import probe  # torch: not for the modules that only read a study

        layer = probe.last_linear(adapter, num_labels)
        if self._weights is None:
            self._weights = _read(self.store, self._published(adapter, layer, split, num_labels, device)["id"])
        probe.load_probe(layer, *self._weights)

    def _published(self, adapter: Any, layer: Any, split: Any, num_labels: int, device: Any) -> dict[str, Any]:
        """The study's probe record, fitting and publishing one first where no worker has."""
        published = record.HEAD_PROBE.get(self.study)
        if published is not None:
            return dict(published)
        mine = _fit(self.store, adapter, layer, split, num_labels, self.seed, device)
        published = optuna_adapter.call_with_retries(lambda: _publish(self.study, mine),
                                                     what="publishing the head probe")
        if published["id"] != mine["id"]:  # another worker published first: every trial uses one probe
            checkpoints.remove_quietly(self.store, mine["id"])
        else:
            logger.info("head_init=\"probe\": fitted on %d training examples in %.1f s, training accuracy %.4f",
                        mine["examples"], mine["seconds"], mine["accuracy"])
        return published


def _fit(store: Any, adapter: Any, layer: Any, split: Any, num_labels: int, seed: int, device: Any) -> dict[str, Any]:
    """Fit a probe on a seeded draw of ``split`` and write it to the store; returns its record."""
    import torch

    from sweeper.finetune import probe

    started = time.time()
    order = probe.probe_order(len(split), seed)
    batches = (split.batch(order[i:i + probe.PROBE_BATCH], device) for i in range(0, len(order), probe.PROBE_BATCH))
    adapter.to(device)
    # Augmented images draw from the global generator: the trial's draws stay as without a probe.
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        features, labels = probe.head_features(adapter, layer, batches)
    weight, bias = probe.fit_probe(features, labels, num_labels)
    artifact_id = f"head-probe-{uuid.uuid4().hex}"
    _write(store, artifact_id, weight, bias)
    return {"id": artifact_id, "examples": len(order),
            "accuracy": round(probe.probe_accuracy(features, labels, weight, bias), 4),
            "seconds": round(time.time() - started, 1)}


def _publish(study: optuna.Study, mine: dict[str, Any]) -> dict[str, Any]:
    with budget.ticket_lock(study) as still_held:
        published = record.HEAD_PROBE.get(study)
        if published is not None:
            return dict(published)
        still_held()
        record.HEAD_PROBE.set(study, mine)
        return mine


def _write(store: Any, artifact_id: str, weight: Any, bias: Any) -> None:
    from safetensors.torch import save

    blob = save({"weight": weight.contiguous(), "bias": bias.contiguous()})
    try:
        store.write(artifact_id, io.BytesIO(blob))
    except Exception as exc:  # noqa: BLE001  (full, unwritable or unreachable: leave no partial file behind)
        checkpoints.remove_quietly(store, artifact_id)
        raise StoreError(f"cannot write the study's head probe ({checkpoints.failure_reason(exc)})") from None


def _read(store: Any, artifact_id: str) -> tuple[Any, Any]:
    from safetensors.torch import load

    try:
        with store.open_reader(artifact_id) as reader:
            tensors = load(reader.read())
    except Exception as exc:  # noqa: BLE001  (gone or unreadable: in a few words)
        raise StoreError(f"cannot read the study's head probe {artifact_id} ({checkpoints.failure_reason(exc)}); "
                         "it is in the artifact store the sweep was launched with") from None
    return tensors["weight"], tensors["bias"]
