"""Experiment configuration: typed models, YAML loading, profiles and dotted overrides.

A config file is YAML whose keys mirror :class:`ExperimentConfig`. Two extra
top-level keys are handled before validation:

- ``extends: other.yaml`` — start from another file (relative to this one) and
  deep-merge this file over it;
- ``profiles: {quick: {...}}`` — named override sets, applied with ``--profile``.

Every key is checked: an unknown or misspelt key raises :class:`ConfigError`
naming the key and the closest valid one.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finegrain.errors import ConfigError


class Section(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SyntheticConfig(Section):
    """The built-in synthetic dataset, written on first use under the cache root."""

    num_classes: int = Field(12, ge=2)
    train_per_class: int = Field(24, ge=2)
    test_per_class: int = Field(12, ge=1)
    image_size: tuple[int, int] = (64, 64)
    seed: int = 0


class DataConfig(Section):
    root: str = "synthetic"
    """A dataset folder (or CSV file), or ``synthetic`` for the built-in dataset."""
    format: str = "auto"
    protocol: Literal["classification", "retrieval"] = "classification"
    holdout: float | None = Field(None, gt=0, lt=1)
    """Make the test split a stratified, seeded fraction of the official train split."""
    val_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    image_size: tuple[int, int] = (224, 224)
    """(height, width) every image is resized to before augmentation."""
    eval_image_sizes: list[tuple[int, int]] = []
    """(height, width) sizes for evaluation, embedding, indexing and search (default: ``image_size``);
    with several, the model's outputs at each size are averaged (multi-scale test-time
    augmentation). Validation uses the first. Testing above the training size can help:
    random-resized-crop training shows objects larger than a whole test image does (Touvron et
    al. 2019, "Fixing the train-test resolution discrepancy")."""
    crop_bbox: bool = False
    bbox_margin: float = Field(0.1, ge=0)
    augment: Literal["plain", "light", "seed", "strong"] = "plain"
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=0)
    """Loader worker processes that decode and augment images. Loaders that read the prepared
    cache without augmentation (evaluation, embedding, ``augment: plain``) read in the main
    process instead: one gather from the memory map costs less than sending the batch from a worker."""
    cache: Literal["auto", "off"] = "auto"
    """``auto``: read the prepared cache (``finegrain data prepare``) when there is one; ``off``: decode every image."""
    on_bad_image: Literal["skip", "fail"] = "skip"
    sampler: Literal["random", "m_per_class"] = "random"
    m_per_class: int = Field(4, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()


class ModelConfig(Section):
    backbone: str = "resnet50"
    weights: str = "none"
    """``imagenet``, ``none``, or a path to a local weights file."""
    head: Literal["classifier", "embedding", "both"] = "classifier"
    dropout: float = Field(0.0, ge=0, lt=1)
    embedding_dim: int = Field(512, ge=2)
    normalize_embedding: bool = True
    bn_neck: bool = False
    stem: Literal["stock", "small"] = "stock"
    cubs: str = "none"
    cubs_stages: list[int] = [4]
    freeze: Literal["none", "backbone", "bn"] = "none"
    freeze_stages: int = Field(0, ge=0)
    """Partial fine-tuning: freeze the backbone's stem and first N stages."""


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    backbone_lr_mult: float = Field(1.0, ge=0)
    """Learning-rate multiplier of the backbone relative to the head(s)."""


class ScheduleConfig(Section):
    name: Literal["none", "step", "cosine", "onecycle"] = "none"
    step_size: int = Field(7, ge=1)
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)


class CrossEntropyLoss(Section):
    """Classification: cross-entropy over the classifier's logits."""

    name: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class MultiSimilarityLoss(Section):
    """Wang et al. 2019 with its pair miner (pytorch-metric-learning names)."""

    name: Literal["multi_similarity"]
    alpha: float = 2.0
    beta: float = 50.0
    base: float = 0.5
    """The similarity offset (lambda in the paper)."""
    miner_epsilon: float = 0.1


class ContrastiveLoss(Section):
    """Hadsell et al. 2006 over Euclidean distances of the embeddings."""

    name: Literal["contrastive"]
    pos_margin: float = Field(0.0, ge=0)
    neg_margin: float = Field(1.0, ge=0)


class TripletLoss(Section):
    """Triplet margin loss with semi-hard triplet mining."""

    name: Literal["triplet"]
    margin: float = Field(0.1, ge=0)


class ProxyAnchorLoss(Section):
    """Kim et al. 2020: one learned proxy per class."""

    name: Literal["proxy_anchor"]
    margin: float = 0.1
    alpha: float = 32.0
    proxy_lr_mult: float = Field(100.0, gt=0)
    """The proxies' learning rate relative to the head's."""


class NormalizedSoftmaxLoss(Section):
    """Zhai & Wu 2018: softmax over cosine similarities to class proxies."""

    name: Literal["normalized_softmax"]
    temperature: float = Field(0.05, gt=0)
    proxy_lr_mult: float = Field(100.0, gt=0)


class ArcFaceLoss(Section):
    """Deng et al. 2019: an additive angular margin (in degrees) on class proxies."""

    name: Literal["arcface"]
    margin: float = Field(28.6, ge=0)
    scale: float = Field(64.0, gt=0)
    proxy_lr_mult: float = Field(100.0, gt=0)


LOSS_CONFIGS: dict[str, type[Section]] = {
    m.model_fields["name"].annotation.__args__[0]: m  # type: ignore[union-attr]
    for m in (CrossEntropyLoss, MultiSimilarityLoss, ContrastiveLoss, TripletLoss, ProxyAnchorLoss,
              NormalizedSoftmaxLoss, ArcFaceLoss)
}
"""Every loss by name, each with only its own settings: no loss can silently ignore a key."""

LossConfig = Annotated[
    CrossEntropyLoss | MultiSimilarityLoss | ContrastiveLoss | TripletLoss | ProxyAnchorLoss
    | NormalizedSoftmaxLoss | ArcFaceLoss,
    Field(discriminator="name"),
]


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"
    """``auto``: what this machine runs fastest (bf16-mixed on a GPU with bf16 or a CPU with native
    bf16, 16-mixed on other GPUs, else 32), decided where the run runs; inference always uses ``auto``."""
    channels_last: bool = False
    grad_clip: float | None = Field(None, gt=0)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    head_epochs: int = Field(0, ge=0)
    """Two-stage fine-tuning: train only the head for this many epochs first."""
    early_stopping_patience: int | None = Field(None, ge=1)
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    limit_train_batches: float | int | None = None
    log_every_n_steps: int = Field(10, ge=1)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_written(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class EvalConfig(Section):
    k: int = Field(10, ge=1)
    """kNN classification: number of neighbours."""
    metric: Literal["euclidean", "cosine"] = "euclidean"
    weights: Literal["uniform", "distance"] = "uniform"
    recall_ks: list[int] = [1, 2, 4, 8]
    tta_flip: bool = False
    source_run: str | None = None
    """kNN rows: the run whose model gives the embeddings (a run name in the same runs folder, or a path)."""


class ExperimentConfig(Section):
    name: str = "experiment"
    description: str = ""
    task: Literal["classification", "metric_learning", "knn"] = "classification"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = CrossEntropyLoss()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _loss_name_defaults(cls, data: Any) -> Any:
        loss = data.get("loss") if isinstance(data, dict) else None
        if isinstance(loss, dict) and "name" not in loss:  # ``loss: {label_smoothing: 0.1}``
            data = {**data, "loss": {"name": "cross_entropy", **loss}}
        return data

    @property
    def trains(self) -> bool:
        """Whether the task trains a model (a kNN row votes with another run's or a pretrained one)."""
        return self.task != "knn"

    @property
    def predicts_with_classifier(self) -> bool:
        """Whether the trained classifier head names the class (else the nearest neighbours vote)."""
        return self.task == "classification"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v


META_KEYS = ("extends", "profiles")


def deep_merge(base: dict, over: dict) -> dict:
    """A new dict: ``over`` merged into ``base`` recursively (dicts merge, the rest replaces)."""
    out = dict(base)
    for k, v in over.items():
        if k == "loss" and isinstance(v, dict) and isinstance(out.get(k), dict) \
                and v.get("name", out[k].get("name")) != out[k].get("name"):
            out[k] = v  # another loss: its settings replace the old loss's, they do not mix
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping; errors name the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` with its ``extends`` chain resolved (profiles kept, merged too)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = load_raw((path.parent / str(parent)), _seen + (path,))
    return deep_merge(base, data)


def check_keys(data: Any, model: type[BaseModel], where: str = "") -> None:
    """Raise ConfigError for the first key in ``data`` that ``model`` does not define."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        dotted = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{where}{close[0]}'?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"unknown config key '{dotted}'{hint} (valid keys here: {valid})")
        sub = fields[key].annotation
        if model is ExperimentConfig and key == "loss" and isinstance(value, dict):
            sub = loss_model(value.get("name", "cross_entropy"))
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            check_keys(value, sub, dotted + ".")


def loss_model(name: Any) -> type[Section]:
    """The settings model of a loss name; an unknown name is an error with the valid ones."""
    if name not in LOSS_CONFIGS:
        close = difflib.get_close_matches(str(name), list(LOSS_CONFIGS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown loss '{name}' (config key 'loss.name').{hint} Valid: {', '.join(LOSS_CONFIGS)}")
    return LOSS_CONFIGS[name]


def migrate_stored(raw: dict) -> dict:
    """A config stored by an older finegrain (in a run's config.yaml or checkpoint), made valid now:
    its ``loss`` section held every loss's settings; keep the named loss's own."""
    loss = raw.get("loss")
    if isinstance(loss, dict) and loss.get("name", "cross_entropy") in LOSS_CONFIGS:
        own = loss_model(loss.get("name", "cross_entropy")).model_fields
        raw = {**raw, "loss": {k: v for k, v in loss.items() if k in own}}
    return raw


def parse_override(item: str) -> dict:
    """``"train.lr=0.01"`` → ``{"train": {"lr": 0.01}}`` (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def build_config(
    raw: dict, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Apply a profile and overrides to a raw mapping and validate it."""
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    raw.pop("extends", None)
    if profile:
        if profile not in profiles:
            names = ", ".join(profiles) or "none defined"
            raise ConfigError(f"unknown profile '{profile}' (this config has: {names})")
        raw = deep_merge(raw, profiles[profile])
    for item in overrides:
        raw = deep_merge(raw, parse_override(item))
    check_keys(raw, ExperimentConfig)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(
    path: str | Path, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a YAML config (or a shipped config by name) with a profile and overrides.

    Every key has a default except what :data:`REQUIRED_KEYS` lists: a config (its file, the files
    it extends, the profile and ``--set`` values together) must say which run it writes, which
    images it learns from and which model it trains, so an empty file cannot train a ResNet-50
    on defaults without a word.
    """
    source = resolve_config_path(path)
    raw = load_raw(source)
    cfg = build_config(raw, profile, overrides)
    missing = missing_required_keys(raw, profile, overrides)
    if missing:
        raise ConfigError(
            f"config {source} does not set {', '.join(missing)}: a config must name its run (name), "
            "its images (data.root: a dataset folder, a CSV file or 'synthetic') and its model "
            "(model.backbone; a kNN row may use eval.source_run's model instead); add "
            f"{'it' if len(missing) == 1 else 'them'} to the file or pass --set KEY=VALUE")
    return cfg


REQUIRED_KEYS = ("name", "data.root", "model.backbone")
"""Keys a config file must set explicitly (``model.backbone`` or, for ``task: knn``, ``eval.source_run``)."""


def missing_required_keys(raw: dict, profile: str | None = None,
                          overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The :data:`REQUIRED_KEYS` that neither ``raw``, its profile nor the overrides set."""
    merged = deep_merge(dict(raw), (raw.get("profiles") or {}).get(profile) or {}) if profile else dict(raw)
    for item in overrides:
        merged = deep_merge(merged, parse_override(item))

    def given(dotted: str) -> bool:
        node: Any = merged
        for part in dotted.split("."):
            if not isinstance(node, dict) or node.get(part) in (None, ""):
                return False
            node = node[part]
        return True

    missing = [k for k in REQUIRED_KEYS if not given(k)]
    if "model.backbone" in missing and merged.get("task") == "knn" and given("eval.source_run"):
        missing.remove("model.backbone")
    return missing


def profiles_of(path: str | Path) -> list[str]:
    """The profile names a config file defines."""
    return list((load_raw(resolve_config_path(path)).get("profiles") or {}).keys())


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict) else ""
        lines.append(f"config key '{loc}': {err['msg']}{shown}")
    return "; ".join(lines)


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config with every default written out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# The shipped configs are package data (``finegrain/configs/*.yaml``), so an installed wheel has
# them too. finegrain is never imported from a zip, so the folder is a real directory, which
# ``load_raw`` needs to follow ``extends: _cars.yaml`` beside a config.
CONFIG_DIR: Path = Path(str(resources.files("finegrain") / "configs"))


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package's ``configs/`` folder (without .yaml)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else a shipped config by name (``cars-tl-1``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{p.stem if p.suffix in ('.yaml', '.yml') else p.name}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(str(name), shipped_configs(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"config not found: '{name}' is neither a file nor a shipped config in {CONFIG_DIR}.{hint}"
    )
