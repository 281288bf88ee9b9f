"""The from-scratch CNNs of the seeds, as backbones returning a pooled feature vector.

Every network here maps ``[B, 3, H, W]`` to ``[B, out_features]`` for any input
size large enough for its max-pools; the classification layer (and the dropout
in front of it, ``model.dropout`` in the config) belongs to the model's head,
see :func:`finegrain.models.model.build_model`.

- :class:`CarsCNN3` (``cars_cnn3``): seed 000, CNN experiment 1 — three
  conv-ReLU-maxpool blocks with 32/64/128 filters, He init, no regularisation,
  then a dense layer of 256 units with ReLU.
- :class:`CarsCNN4` (``cars_cnn4``): seed 000, CNN experiments 2 and 3 — four
  conv-BatchNorm-ReLU-maxpool blocks with 32/64/128/256 filters, He init, then a
  dense layer of 512 units with ReLU. The seed's dropout of 0.5 is the head's
  dropout (``model.dropout: 0.5``), in front of the classification layer.
- :class:`TinCNN` (``tin_cnn``): seed 001 task 1 — a shallow CNN for 64x64 Tiny
  ImageNet with dropout after every block. The seed's "L2 regularisation on
  every layer" is the optimiser's ``weight_decay`` (``optim.weight_decay``), which
  for SGD/Adam adds ``wd * w`` to every gradient, i.e. an L2 penalty of
  ``wd/2 * ||w||^2`` on every layer.

The seeds give the block structure and filter counts but not the layer after the
last block; these networks pool the last map (input-size independent) instead
of flattening it.
"""

from __future__ import annotations

from torch import nn


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init for convolutions and linear layers, zero biases, BN at (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CarsCNN3(nn.Module):
    """Seed 000 CNN exp. 1: 3 x (conv3x3-ReLU-maxpool2), 32/64/128 filters, He init.

    The last map is average-pooled to 4x4 (a size-independent stand-in for the
    seed's flatten) and flattened to 2048 values, then a dense layer of 256 units
    with ReLU gives the features. No BatchNorm, no dropout.
    """

    out_features = 256

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (32, 64, 128):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, self.out_features), nn.ReLU(inplace=True))
        he_init(self)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


class CarsCNN4(nn.Module):
    """Seed 000 CNN exp. 2/3: 4 x (conv3x3-BN-ReLU-maxpool2), 32/64/128/256 filters, He init.

    Global average pool (256) then a dense layer of 512 units with ReLU. The
    seed's dropout 0.5 is the head's (``model.dropout``).
    """

    out_features = 512

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (32, 64, 128, 256):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(256, self.out_features), nn.ReLU(inplace=True))
        he_init(self)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


class TinCNN(nn.Module):
    """Seed 001 task 1: a shallow CNN for 64x64 inputs with dropout after every block.

    Three blocks of two 3x3 conv-BN-ReLU layers (64, 128, 256 filters), each
    followed by a 2x2 max-pool and dropout ``block_dropout`` (0.25); global average
    pool, a dense layer of 512 units with ReLU. L2 regularisation on every layer
    is applied by the optimiser's ``weight_decay`` (the ``tin-cnn`` config sets
    ``optim.weight_decay: 0.0005``) and the final dropout is the head's
    (``model.dropout: 0.5``).
    """

    out_features = 512

    def __init__(self, block_dropout: float = 0.25) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (64, 128, 256):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout(block_dropout),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(256, self.out_features), nn.ReLU(inplace=True))
        he_init(self)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


CNNS: dict[str, type[CarsCNN3 | CarsCNN4 | TinCNN]] = {"cars_cnn3": CarsCNN3, "cars_cnn4": CarsCNN4, "tin_cnn": TinCNN}


def cars_cnn3() -> CarsCNN3:
    return CarsCNN3()


def cars_cnn4() -> CarsCNN4:
    return CarsCNN4()


def tin_cnn() -> TinCNN:
    return TinCNN()
