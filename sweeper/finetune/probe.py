"""A linear probe of the pretrained model: the new head's first weights under ``head_init="probe"``.

Model soups average trials that start from one point; Wortsman et al. (ICML 2022) start every
ingredient's head from one linear probe, and LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can
Distort Pretrained Features and Underperform Out-of-Distribution") shows that a head fitted
first moves the pretrained features less in fine-tuning than a random one. The probe is the
new head's last linear layer (BERT's ``classifier``, RoBERTa's ``out_proj``, a ResNet's ``fc``)
fitted by multinomial logistic regression to what that layer sees of the pretrained model,
every other weight as loaded, in evaluation mode (no dropout).

Pure PyTorch: :func:`fit_probe` knows nothing of studies or stores (``head_probe.py`` shares
one probe between the workers of a sweep).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from sweeper.errors import SweepError

PROBE_EXAMPLES = 8192  # training examples the probe is fitted on (seconds on a GPU, a minute or two on 2 cores)
PROBE_BATCH = 64  # examples per forward pass of the pretrained model
LBFGS_ITERATIONS = 200  # enough for the loss of a 2-class probe of 384 features to stop moving in float32


def last_linear(adapter: Any, num_labels: int) -> nn.Linear:
    """The layer of the head that maps to the classes: the last ``nn.Linear`` of the head
    modules with ``num_labels`` outputs."""
    found = [m for head in adapter.head_modules for m in head.modules()
             if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not found:
        raise SweepError(f"head_init=\"probe\": the head of this {type(adapter.model).__name__} has no linear layer "
                         f"with {num_labels} outputs to fit; use head_init=\"shared\" or \"trial\"")
    return found[-1]


@torch.no_grad()
def head_features(adapter: Any, layer: nn.Linear, batches: Iterable[dict[str, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``layer`` sees of every example of ``batches`` (float32, on the CPU) and the labels,
    the model in evaluation mode; its training mode is given back after."""
    seen: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].detach().float().cpu()))
    was_training = adapter.model.training
    adapter.eval()
    try:
        for batch in batches:
            adapter(batch)
            labels.append(batch["labels"].cpu())
    finally:
        handle.remove()
        adapter.train(was_training)
    return torch.cat(seen), torch.cat(labels)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_labels: int,
              iterations: int = LBFGS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a multinomial logistic regression of ``labels`` on ``features``,
    fitted by L-BFGS from zeros, with scikit-learn's default L2 strength (``C=1``: the mean
    cross-entropy plus ‖W‖² / 2n). Deterministic for the same inputs."""
    n, width = features.shape
    x = features.double()
    weight = torch.zeros(num_labels, width, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight.T + bias, labels) + (weight ** 2).sum() / (2 * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """The probe's accuracy on the examples it was fitted on (recorded, to see what it starts from)."""
    return float(((features @ weight.T + bias).argmax(1) == labels).float().mean())


def probe_order(examples: int, seed: int, limit: int = PROBE_EXAMPLES) -> np.ndarray:
    """The training examples the probe sees: a seeded draw of at most ``limit``."""
    return np.sort(np.random.default_rng(seed).permutation(examples)[:limit])


def load_probe(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Put the probe into ``layer`` (its dtype and device)."""
    if tuple(weight.shape) != tuple(layer.weight.shape):
        raise SweepError(f"head_init=\"probe\": the study's probe is {tuple(weight.shape)}, the head's layer "
                         f"{tuple(layer.weight.shape)}; a study keeps one model: start a new study for another")
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias))
