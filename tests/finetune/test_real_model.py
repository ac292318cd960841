"""The real pretrained encoder from ../shared, fine-tuned on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweeper.finetune.data import TextData, prepare
from sweeper.finetune.loop import Hyper, LoopSettings, evaluate, train
from sweeper.finetune.model_specs import TextClassifier
from tests.helpers import MINILM, SST2


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.long
def test_minilm_fine_tuned_for_75_steps_beats_75_percent_on_held_out_sst2(tmp_path: Path) -> None:
    # 75 steps of 32 reach 0.815 on all 872 held-out sentences (200 steps reached 0.817), at
    # about a third of the time: the figure, not the step count, is what the test shows.
    spec = TextClassifier(str(MINILM))
    data = prepare(TextData(str(SST2), validation_fraction=0.005, max_train_samples=2400, max_length=64),
                   tmp_path, seed=0, tokenizer=spec.tokenizer(tmp_path), tokenizer_id=spec.identity())
    torch.manual_seed(0)
    adapter = spec.build(data.num_labels, tmp_path)
    settings = LoopSettings(epochs=1, metric="accuracy", direction="maximize", device=torch.device("cpu"),
                            seed=0, pretrain_loss="l2sp", evals_per_epoch=1)
    result = train(adapter, data, Hyper(learning_rate=4e-4, batch_size=32, unfreeze_depth=2,
                                        pretrain_loss_weight=0.1), settings)
    assert result.steps == 75
    held_out = evaluate(adapter, data.test, torch.device("cpu"), False, data.num_labels)
    print(f"SST-2 held-out accuracy after {result.steps} steps: {held_out['accuracy']:.4f} "
          f"({result.samples_per_second:.0f} samples/s)")
    assert held_out["accuracy"] > 0.75
