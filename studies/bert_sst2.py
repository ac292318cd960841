"""BERT-base on GLUE SST-2: the headline sweep.

    sweeper launch studies/bert_sst2.py --workers 4

Needs a GPU (one trial is about 10 minutes of an H100 at 3 epochs) and, as written, the
Hugging Face hub for `bert-base-uncased` and `glue/sst2` (pip install 'sweeper[hub]').
Offline, point it at local copies, e.g. the 6-block MiniLM encoder and the SST-2 TSV files:

    sweeper launch studies/bert_sst2.py --workers 4 \
        --set model=../shared/models/minilm-l6-h384 data=../shared/data/sst2 \
        --set space.unfreeze_depth=0..6

The sweep tunes on 5% of SST-2 train held out as validation; GLUE validation is the held-out
test, scored for the best trial only.
"""

from sweeper import Int, LogFloat, Sweep, TextClassifier, TextData

sweep = Sweep(
    name="bert-sst2",
    model=TextClassifier("bert-base-uncased"),
    data=TextData("glue/sst2", train="train", test="validation", max_length=128,
                  label_names=("negative", "positive")),  # also when --set data= names the TSV folder
    space={
        "learning_rate": LogFloat(1e-6, 1e-3),
        "weight_decay": LogFloat(1e-6, 1e-1),
        "unfreeze_depth": Int(0, 12),
        "pretrain_loss_weight": LogFloat(1e-4, 10.0),
        "batch_size": 32,
    },
    pretrain_loss="distill",
    epochs=3,
    evals_per_epoch=2,
    metric="accuracy",
    direction="maximize",
    n_trials=64,
    pruner="hyperband",
)
