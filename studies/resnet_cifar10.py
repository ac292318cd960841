"""ResNet-18 (ImageNet weights) on CIFAR-10: a CNN sweep.

    sweeper launch studies/resnet_cifar10.py --workers 4

Needs torchvision (pip install 'sweeper[vision]'), a GPU for a useful pace, and a network
the first time (torchvision downloads the weights and CIFAR-10). Offline, give it a local
weights file and an image folder:

    sweeper launch studies/resnet_cifar10.py \
        --set model.weights=/path/resnet18.safetensors data=/path/images

A ResNet-18 has 8 residual blocks: unfreeze depth 0 trains only the new final layer, 8 the
whole network.
"""

from sweeper import ImageClassifier, ImageData, Int, LogFloat, Sweep

sweep = Sweep(
    name="resnet-cifar10",
    model=ImageClassifier("resnet18", weights="DEFAULT"),
    data=ImageData("CIFAR10", image_size=32, augment=True),
    space={
        "learning_rate": LogFloat(1e-5, 1e-1),
        "weight_decay": LogFloat(1e-6, 1e-2),
        "unfreeze_depth": Int(0, 8),
        "pretrain_loss_weight": LogFloat(1e-4, 10.0),
        "batch_size": 128,
    },
    pretrain_loss="l2sp",
    epochs=10,
    metric="accuracy",
    direction="maximize",
    n_trials=48,
    pruner="hyperband",
)
