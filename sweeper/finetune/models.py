"""Model adapters: a pretrained model seen as a stem, an ordered list of blocks, and a head.

Every adapter answers the same questions, so that freezing, the pretraining losses and the
training loop never look inside a particular architecture:

- ``embed(batch)``: the stem (token embeddings, or the convolutional stem), and a context
  (the attention mask) that later blocks need;
- ``run(hidden, context, blocks)``: a run of blocks (a slice of ``blocks``), bottom to top;
- ``head(hidden, context)``: the new task head on top of the last block;
- ``pool(hidden, context)``: one feature vector per example (mean over real tokens, or the
  global average pool), which the ``distill`` loss compares with the pretrained model's.

Running ``embed``, all blocks and ``head`` is exactly the wrapped model's own forward pass
(tests check it), which is what lets the training loop compute the frozen bottom once.

What a study file names (``TextClassifier``, ``ImageClassifier``, ``TinyTextClassifier``) is
in ``model_specs.py``, which needs no PyTorch; this module builds and loads the models those
specs describe.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sweeper.errors import ModelNotLoaded, SweepError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- adapters


class BlockCall(Protocol):
    def __call__(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor: ...


class ModelAdapter:
    """Base class: subclasses set ``model``, ``stem``, ``blocks`` and ``head_modules``.

    Not itself an ``nn.Module``: it only points into ``model``, so that parameters and state
    dicts are always the wrapped model's own, under the model's own names.
    """

    kind: str = ""
    model: Any  # an nn.Module of transformers or torchvision, whose parts are reached by attribute
    stem: nn.Module
    blocks: nn.ModuleList
    head_modules: list[nn.Module]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def train(self, mode: bool = True) -> ModelAdapter:
        self.model.train(mode)
        return self

    def eval(self) -> ModelAdapter:
        return self.train(False)

    def to(self, device: torch.device | str) -> ModelAdapter:
        self.model.to(device)
        return self

    def embed(
        self, batch: dict[str, torch.Tensor], stem: nn.Module | None = None
    ) -> tuple[torch.Tensor, Any]:
        """The stem's output and the context later blocks need; ``stem`` replaces ours
        (the ``distill`` loss runs a frozen pretrained copy)."""
        raise NotImplementedError

    def context(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> Any:
        """The context ``embed`` returns, rebuilt from the batch alone: for hidden states that
        come from the frozen-prefix cache instead of the stem (``prefix.py``)."""
        raise NotImplementedError

    def run(
        self, hidden: torch.Tensor, context: Any, blocks: Iterable[nn.Module], call: BlockCall | None = None
    ) -> torch.Tensor:
        """``blocks`` (a slice of ``self.blocks``, or copies of one), bottom to top; ``call``
        runs each (``compiled.py`` passes its compiled one), by default :meth:`call_block`."""
        call = call or self.call_block
        for block in blocks:
            hidden = call(block, hidden, context)
        return hidden

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """One block: a plain function of its arguments, so that one compiled copy serves
        every block of every model of this kind."""
        raise NotImplementedError

    @staticmethod
    def varying_dims(hidden: torch.Tensor, context: Any) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
        """The inputs of :meth:`call_block` and which of their dimensions change from batch
        to batch: the compiler builds one graph for all their sizes."""
        raise NotImplementedError

    @staticmethod
    def steady_context(hidden: torch.Tensor, context: Any) -> Any:
        """``context`` with the same structure for every batch (the compiler builds a graph
        per structure); the same results."""
        return context

    def head(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, context = self.embed(batch)
        return self.head(self.run(hidden, context, self.blocks), context)

    def save(self, folder: Path, tokenizer: Any = None) -> None:
        raise NotImplementedError


class TextAdapter(ModelAdapter):
    """A Hugging Face ``AutoModelForSequenceClassification`` of the BERT family.

    Blocks are the encoder's transformer layers; the stem is the embedding layer; the head
    is the pooler and classifier (BERT) or the classification head (RoBERTa, ELECTRA).
    """

    kind = "text"

    def __init__(self, model: Any) -> None:  # a transformers model: its parts are attributes
        self.model = model
        base = model.base_model
        encoder = getattr(base, "encoder", None)
        if encoder is None or not hasattr(encoder, "layer") or not hasattr(base, "embeddings"):
            raise SweepError(
                f"the model is a {type(model).__name__}, whose layers sweeper cannot find: "
                "use a BERT-family encoder (BERT, RoBERTa, ELECTRA, MiniLM, XLM-R)"
            )
        self.config = model.config
        self.stem = base.embeddings
        self.blocks = encoder.layer
        self._pooler = getattr(base, "pooler", None) if hasattr(model, "dropout") else None
        self._pooled_head = hasattr(model, "dropout")  # BERT style: classifier(dropout(pooler))
        self.head_modules = [m for m in (self._pooler, model.classifier) if m is not None]

    def embed(
        self, batch: dict[str, torch.Tensor], stem: nn.Module | None = None
    ) -> tuple[torch.Tensor, Any]:
        stem = stem or self.stem
        hidden = stem(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        return hidden, self.context(batch, hidden)

    def context(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"]
        )
        return mask, batch["attention_mask"]

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return block(hidden, context[0])

    @staticmethod
    def varying_dims(hidden: torch.Tensor, context: Any) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
        yield hidden, (0, 1)  # batch, sequence length (length-bucketed batches differ); not the width
        yield context[0], tuple(range(context[0].ndim))  # the attention mask, batch x 1 x length x length

    @staticmethod
    def steady_context(hidden: torch.Tensor, context: Any) -> Any:
        # A batch without padding has no mask (None): give it one that masks nothing.
        if context[0] is not None:
            return context
        batch, length = hidden.shape[:2]
        return torch.ones(batch, 1, length, length, dtype=torch.bool, device=hidden.device), context[1]

    def head(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        if self._pooled_head:
            pooled = self._pooler(hidden) if self._pooler is not None else hidden[:, 0]
            return self.model.classifier(self.model.dropout(pooled))
        return self.model.classifier(hidden)

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        weights = context[1].unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def save(self, folder: Path, tokenizer: Any = None) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


class ResNetAdapter(ModelAdapter):
    """A torchvision ResNet: blocks are its residual blocks (8 for ResNet-18, 16 for -50)."""

    kind = "image"

    def __init__(self, model: Any, arch: str, label_names: Sequence[str] = ()) -> None:  # a torchvision ResNet
        self.model = model
        self.arch = arch
        self.label_names = _class_names(model.fc.out_features, label_names)  # the class folders' names
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        self.blocks = nn.ModuleList(
            [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
        )
        self.head_modules = [model.fc]

    def embed(
        self, batch: dict[str, torch.Tensor], stem: nn.Module | None = None
    ) -> tuple[torch.Tensor, Any]:
        return (stem or self.stem)(batch["pixel_values"]), None

    def context(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> Any:
        return None

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return block(hidden)

    @staticmethod
    def varying_dims(hidden: torch.Tensor, context: Any) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
        yield hidden, (0,)  # only the batch (the last one is short); images have one size

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return torch.flatten(self.model.avgpool(hidden), 1)

    def head(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return self.model.fc(self.pool(hidden, context))

    def save(self, folder: Path, tokenizer: Any = None) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        config = {"arch": self.arch, "num_classes": self.model.fc.out_features, "format": "torchvision",
                  "id2label": dict(enumerate(self.label_names))}
        (folder / "config.json").write_text(json.dumps(config, indent=1))


# --------------------------------------------------------------------------- building


def text_adapter(path: str, num_labels: int, dropout: float | None = None,
                 label_names: Sequence[str] = ()) -> TextAdapter:
    """The pretrained encoder at ``path`` with a new head of ``num_labels`` (``TextClassifier.build``)."""
    from transformers import AutoModelForSequenceClassification

    config, state = pretrained_text_weights(path)
    config = copy.deepcopy(config)
    config.num_labels = num_labels
    # A pipeline on the exported model answers with these names instead of LABEL_k (issue 18.2).
    names = _class_names(num_labels, label_names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: k for k, name in enumerate(names)}
    config.problem_type = "single_label_classification"
    if dropout is not None:
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
    model = AutoModelForSequenceClassification.from_config(config)
    missing, _ = model.base_model.load_state_dict(state, strict=False)
    if any(not k.startswith("pooler.") for k in missing):
        raise SweepError(f"the weights in {path!r} do not fit its config: missing {missing[:3]}")
    return TextAdapter(model)


def resnet_adapter(arch: str, weights: str, num_labels: int, label_names: Sequence[str] = ()) -> ResNetAdapter:
    """A torchvision ResNet with a new final layer (``ImageClassifier.build``)."""
    model = load_resnet(arch, weights)
    model.fc = nn.Linear(model.fc.in_features, num_labels)
    return ResNetAdapter(model, arch, _class_names(num_labels, label_names))


def write_tiny_bert(folder: Path, layers: int, hidden: int, heads: int, seed: int) -> None:
    """Save a random BERT with a masked-LM head, and its tokenizer, into ``folder``
    (``TinyTextClassifier.materialise``, which holds the folder's lock)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast  # type: ignore[attr-defined]

    quiet_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    from sweeper.finetune.data import synthetic_vocabulary

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *synthetic_vocabulary()]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=hidden * 4,
        max_position_embeddings=128,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------- loading


def quiet_transformers() -> None:
    """Hide transformers' load reports and progress bars: a new head's "newly initialised"
    weights are expected here, and every worker would print them for every trial."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

# One worker runs many trials of the same model: keep the pretrained weights in memory and
# copy them per trial instead of reading (and for a hub model, resolving) them every time.
_TEXT_WEIGHTS: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}


def pretrained_text_weights(path: str) -> tuple[Any, dict[str, torch.Tensor]]:
    if path not in _TEXT_WEIGHTS:
        from transformers import AutoModel

        quiet_transformers()
        try:
            # Loading initialises what the checkpoint lacks (a pooler) from the global generator:
            # on a fork of it, so the first build of a process gets the same head, after the
            # same manual_seed, as every later build (which finds the weights cached); and from
            # a fixed seed, so that what is missing is the same whatever the process drew before.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                base = AutoModel.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelNotLoaded(path, exc) from None
        _TEXT_WEIGHTS[path] = (base.config, {k: v.detach().clone() for k, v in base.state_dict().items()})
    return _TEXT_WEIGHTS[path]


def _class_names(num_labels: int, label_names: Sequence[str]) -> list[str]:
    """``label_names`` where there is one per class, else transformers' default ``LABEL_k``."""
    if len(label_names) == num_labels:
        return [str(name) for name in label_names]
    return [f"LABEL_{k}" for k in range(num_labels)]


def checkpoint_has_lm_head(path: str) -> bool:
    from safetensors import safe_open

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if any(k.startswith(("cls.predictions", "lm_head", "generator_lm_head")) for k in handle.keys()):
                return True
    return False


def masked_lm_head(path: str) -> nn.Module:
    from transformers import AutoModelForMaskedLM

    quiet_transformers()
    if not checkpoint_has_lm_head(path):
        raise SweepError(
            f"pretrain_loss='mlm' needs a checkpoint with a masked-LM head, and {path!r} has none: "
            "use pretrain_loss=distill or l2sp, or a model saved with its MLM head"
        )
    with torch.random.fork_rng(devices=[]):  # as in pretrained_text_weights
        lm = AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32)
    head = getattr(lm, "cls", None) or getattr(lm, "lm_head", None)
    if head is None:
        raise SweepError(f"cannot find the masked-LM head of {type(lm).__name__}")
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def load_resnet(arch: str, weights: str) -> Any:  # a torchvision ResNet
    try:
        import torchvision  # optional: pip install 'sweeper[vision]'
    except ImportError:
        raise SweepError("ResNet models need torchvision: pip install 'sweeper[vision]'") from None
    factory = getattr(torchvision.models, arch)
    if weights.lower() == "none":
        return factory(weights=None)
    if weights.endswith(".safetensors") or os.path.sep in weights:
        from safetensors.torch import load_file

        if not os.path.isfile(weights):
            raise SweepError(f"`model.weights` is {weights!r}, which does not exist")
        model = factory(weights=None)
        state = load_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.load_state_dict(state, strict=False)
        return model
    try:
        return factory(weights=weights)
    except Exception as exc:  # torchvision raises URLError, RuntimeError, ValueError ...
        raise SweepError(
            f"could not load torchvision's {arch} weights {weights!r} ({type(exc).__name__}): "
            "without a network, save them once as .safetensors and set model.weights to that "
            "file, or model.weights=none for random weights"
        ) from None


def from_checkpoint(folder: Path) -> ModelAdapter:
    """The adapter of a saved trial checkpoint (``TextAdapter.save`` / ``ResNetAdapter.save``).

    Only safetensors weights and JSON configs are read: no code from the checkpoint runs.
    """
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("format") == "torchvision":
        from safetensors.torch import load_file

        model = load_resnet(config["arch"], "none")
        model.fc = nn.Linear(model.fc.in_features, int(config["num_classes"]))
        model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        names = config.get("id2label", {})
        return ResNetAdapter(model, config["arch"], [names[k] for k in sorted(names, key=int)])
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    return TextAdapter(model)
