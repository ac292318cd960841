"""A tiny sweep that runs anywhere, offline, on a CPU, in about a minute.

    sweeper launch studies/quickstart.py --workers 2

A small random BERT (built on the spot) learns a generated sentiment task; 12 trials search
the learning rate, weight decay, unfreeze depth and λ of the l2sp term, and Hyperband stops the
hopeless ones early. Needs nothing but the package: no GPU, no download.
"""

from sweeper import Int, LogFloat, Sweep, SyntheticText, TinyTextClassifier

sweep = Sweep(
    name="quickstart",
    model=TinyTextClassifier(layers=2, hidden=64, heads=2),
    data=SyntheticText(n_train=2000, n_test=500),
    space={
        "learning_rate": LogFloat(1e-4, 1e-2),
        "weight_decay": LogFloat(1e-6, 1e-1),
        "unfreeze_depth": Int(0, 2),
        "pretrain_loss_weight": LogFloat(1e-4, 10.0),
        "batch_size": 32,
    },
    pretrain_loss="l2sp",
    epochs=4,
    evals_per_epoch=2,
    metric="accuracy",
    direction="maximize",
    n_trials=12,
    pruner="hyperband",
    keep=3,
)
