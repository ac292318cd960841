"""Your own training code as a sweeper study: a regression task, offline, on a CPU, in about a minute.

    sweeper launch studies/regression.py --workers 2

`train` below is ordinary PyTorch: sweeper calls it once per trial with the trial's
hyperparameters, its device, its seed and a context to report to. A tiny random BERT (built on
the spot) reads generated token sequences and predicts a number from them (the share of
"positive" tokens, plus noise); the sweep searches the learning rate, the weight decay, the
unfreeze depth (how many top blocks train; the embeddings and the blocks below stay frozen) and
λ of an L2 pull towards the initial weights, which this function defines itself. Everything
around it is sweeper's: the budget, the workers, pruning, retries that resume from
`context.save`, keep-top-k and `sweeper best`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from sweeper import Int, LogFloat, Sweep, TrialContext

VOCAB, LENGTH, EXAMPLES, EPOCHS, BATCH = 64, 24, 2048, 4, 64


class Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same "pretrained" encoder for every trial
        self.encoder = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=LENGTH))
        self.head = torch.nn.Linear(32, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=tokens).last_hidden_state[:, 0]).squeeze(-1)


def generated(split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences and their target: the share of tokens below VOCAB / 2, plus noise."""
    generator = torch.Generator().manual_seed(split)
    tokens = torch.randint(1, VOCAB, (EXAMPLES, LENGTH), generator=generator)
    target = (tokens < VOCAB // 2).float().mean(dim=1) * 4 + 0.05 * torch.randn(EXAMPLES, generator=generator)
    return tokens, target


def train(params: dict[str, Any], device: torch.device, seed: int, context: TrialContext) -> None:
    model = Regressor().to(device)
    torch.manual_seed(seed)  # the trial's own dropout
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = model.encoder.encoder.layer
    for p in model.encoder.parameters():  # unfreeze the top `unfreeze_depth` blocks only
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - params["unfreeze_depth"]:]:
        block.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params["learning_rate"], weight_decay=params["weight_decay"])
    state = context.load()  # a retry continues here
    first_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch = state["epoch"]
    tokens, target = generated(split=1)
    val_tokens, val_target = generated(split=2)
    for epoch in range(first_epoch, EPOCHS):
        model.train()
        order = torch.randperm(EXAMPLES, generator=torch.Generator().manual_seed(seed + epoch))
        for batch in order.split(BATCH):
            loss = torch.nn.functional.mse_loss(model(tokens[batch].to(device)), target[batch].to(device))
            pull = sum(((p - start[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad)
            optimizer.zero_grad()
            (loss + params["pretrain_loss_weight"] * pull).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            error = torch.nn.functional.mse_loss(model(val_tokens.to(device)), val_target.to(device)).item()
        context.report(error ** 0.5, mse=error)  # the pruner may end the trial here
        context.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1})
        if context.should_stop():
            return
    folder = Path(context.scratch) / "model"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))  # what `sweeper best` hands out
    context.save_model(folder)


sweep = Sweep(
    name="regression",
    train=train,
    space={
        "learning_rate": LogFloat(1e-4, 3e-2),
        "weight_decay": LogFloat(1e-6, 1e-1),
        "unfreeze_depth": Int(0, 2),
        "pretrain_loss_weight": LogFloat(1e-6, 1e-1),
    },
    metric="rmse",
    direction="minimize",
    n_trials=8,
    pruner="median",
    keep=2,
)
