"""What one trial trains with: its hyperparameters (:class:`Hyper`, what a study's ``space``
may search) and the kinds of pretraining loss.

Apart from the loop and the losses that use them, so that checking a study file needs no
PyTorch (``model_specs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sweeper.finetune import rules
from sweeper.finetune.rules import Blocks, Range, setting

# The L_pretrain of L = L_task + λ·L_pretrain (losses.py), and those trial arrays train (arrays.py).
PRETRAIN_LOSSES = ("none", "l2sp", "distill", "mlm")
ARRAY_PRETRAIN_LOSSES = ("none", "l2sp")


@dataclass
class Hyper:
    """The training hyperparameters of one trial: what a study's ``space`` may search."""

    learning_rate: float = setting(5e-5, "AdamW step size; typically 1e-6..1e-2", Range(0, above=True))
    weight_decay: float = setting(0.0, "decoupled weight decay on weight matrices; typically 0..0.3", Range(0))
    unfreeze_depth: int | None = setting(None, "top blocks that train; None = all (full fine-tuning)", Blocks())
    pretrain_loss_weight: float = setting(0.0, "λ in L = L_task + λ·L_pretrain; typically 1e-4..10", Range(0))
    warmup_ratio: float = setting(0.06, "share of the steps with a linear learning-rate warmup; typically 0..0.5",
                                  Range(0, 1, below=True))
    batch_size: int = setting(32, "examples per step", Range(1, whole=True, unit="examples"))
    dropout: float | None = setting(None, "hidden and attention dropout of a text model",
                                    Range(0, 1, below=True, none="the model's own"))
    label_smoothing: float = setting(0.0, "of the task cross-entropy; typically 0..0.3", Range(0, 1, below=True))
    max_grad_norm: float = setting(1.0, "gradient clipping of the trainable parameters; 0 = none", Range(0))
    adam_beta2: float = setting(0.999, "AdamW's second-moment decay; typically 0.9..0.9999", Range(0, 1, below=True))

    def check(self, num_blocks: int | None = None, prefix: str = "") -> list[str]:
        """Every value that breaks its rule; ``unfreeze_depth`` only where the model's
        ``num_blocks`` is known. ``prefix`` is where the values sit (``"space."``)."""
        return rules.problems(self, prefix, blocks=num_blocks)


HYPERPARAMETERS = tuple(Hyper.__dataclass_fields__)
