from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweeper.errors import SweepError
from sweeper.finetune.data import SyntheticText, prepare
from sweeper.finetune.model_specs import ImageClassifier, TextClassifier, TinyTextClassifier
from sweeper.finetune.models import from_checkpoint
from tests.helpers import MINILM


def _text_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: v for k, v in encoded.items()} | {"labels": torch.zeros(len(texts), dtype=torch.long)}


def test_text_adapter_blocks_reproduce_the_model_forward(model_cache: Path) -> None:
    spec = TinyTextClassifier(layers=3, hidden=32, heads=2)
    adapter = spec.build(num_labels=3, cache_dir=model_cache).eval()
    assert adapter.num_blocks == 3
    batch = _text_batch(spec.tokenizer(model_cache), ["the film was good", "not bad at all and very witty"])
    with torch.no_grad():
        ours = adapter(batch)
        theirs = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).logits
    assert ours.shape == (2, 3)
    torch.testing.assert_close(ours, theirs)


def test_real_minilm_loads_offline_with_six_blocks(model_cache: Path) -> None:
    spec = TextClassifier(str(MINILM))
    assert spec.num_blocks(model_cache) == 6
    adapter = spec.build(num_labels=2, cache_dir=model_cache).eval()
    batch = _text_batch(spec.tokenizer(model_cache), ["a gripping, funny film", "dull"])
    with torch.no_grad():
        torch.testing.assert_close(adapter(batch), adapter.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def test_resnet_adapter_blocks_reproduce_the_model_forward() -> None:

    adapter = ImageClassifier("resnet18", weights="none").build(num_labels=10, cache_dir=Path("."))
    adapter.eval()
    assert adapter.num_blocks == 8
    batch = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(adapter(batch), adapter.model(batch["pixel_values"]))


def test_unknown_hub_model_offline_says_what_to_do(model_cache: Path) -> None:
    with pytest.raises(SweepError, match="--set model="):
        TextClassifier("/nonexistent/model-folder").build(2, model_cache)


def test_checkpoint_round_trip_loads_with_from_pretrained(model_cache: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    spec = TinyTextClassifier(layers=2, hidden=32, heads=2)
    adapter = spec.build(num_labels=2, cache_dir=model_cache).eval()
    tokenizer = spec.tokenizer(model_cache)
    adapter.save(tmp_path, tokenizer)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pkl"))
    batch = _text_batch(tokenizer, ["very good"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    again = from_checkpoint(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   adapter(batch))
        torch.testing.assert_close(again(batch), adapter(batch))


def test_the_same_seed_gives_the_same_tiny_model(tmp_path: Path, model_cache: Path) -> None:
    a = TinyTextClassifier(layers=1, hidden=16, heads=2, seed=3)
    first = a.materialise(tmp_path / "a")
    second = a.materialise(tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    data = prepare(SyntheticText(n_train=40, n_test=5), tmp_path / "cache", 0, a.tokenizer(tmp_path / "a"), a.identity())
    assert data.num_labels == 2


def test_the_first_build_of_a_process_equals_later_ones_after_the_same_seed(tmp_path: Path) -> None:
    # The first build loads the checkpoint (and initialises its missing pooler); that must not
    # move the generator the new head is drawn from.
    spec = TinyTextClassifier(layers=2, hidden=32, heads=2, seed=11)  # a checkpoint no test loaded yet
    builds = []
    for _ in range(2):
        torch.manual_seed(0)
        builds.append(spec.build(2, tmp_path))
    for (name, first), (_, second) in zip(builds[0].named_parameters(), builds[1].named_parameters()):
        assert torch.equal(first, second), name
