"""The typed sections of an experiment config and :class:`ExperimentConfig` that holds them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finegrain.config.backbone_names import check_backbone
from finegrain.config.losses import CrossEntropyLoss, LossConfig
from finegrain.config.section import Section
from finegrain.errors import ConfigError


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
    holdout: float | Literal["auto"] | None = None
    """Where the test images come from. ``auto`` (every shipped config's): the data's own test split (a ``test/``
    folder, a CSV's ``split`` column, a dataset's official test images) wherever it has one, else a
    held-out part of it: classification, a seeded stratified ``holdout_fraction`` of the training
    images; retrieval, the second half of the classes. A fraction (classification): that seeded
    stratified holdout of the training images even where the data has a test split, which is then
    not used (with a warning). ``null`` (default): classification on the data's test split only (an
    error where it has none); retrieval on the second half of the classes, every split merged (the
    Cars196 protocol). Every run says which images it was tested on (``metrics.json``'s ``tested_on``)."""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """The fraction of the training images ``holdout: auto`` tests on where the data has no test split."""
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
    progressive_sizes: list[tuple[int, int, int]] = []
    """Progressive resizing: ``(height, width, epochs)`` stages, in order, that train the first epochs
    on smaller images before the rest train at ``image_size`` (for example ``[[128, 171, 4], [160, 213,
    3]]``: epochs 0-3 at 128x171, 4-6 at 160x213, then ``image_size``). A step on smaller images costs
    about their share of the pixels. Not with ``train.frozen_cache_views`` (its cache holds one size)."""
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

    @field_validator("holdout")
    @classmethod
    def _holdout_is_a_fraction(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float | int) and not 0 < v < 1:
            raise ValueError("must be auto, a fraction between 0 and 1 (exclusive) or null")
        return v


class ModelConfig(Section):
    backbone: str = "resnet50"
    weights: str = "none"
    """``imagenet``, ``none``, or a path to a local weights file."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        return check_backbone(v)

    head: Literal["classifier", "cosine", "embedding", "both"] = "classifier"
    """``classifier``: a linear layer on the features; ``cosine``: a cosine classifier on them (class
    scores are cosine similarities over a temperature of 0.05); ``embedding``: an embedder;
    ``both``: an embedder and a linear classifier on the embedding."""
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
    drop_path: float = Field(0.0, ge=0, lt=1)
    """Stochastic depth of timm backbones (``efficientnet_lite*``, ``timm:*``): during training each
    residual block is skipped with a probability rising linearly from 0 to this over the blocks."""
    global_pool: Literal["avg", "max", "avgmax"] = "avg"
    """How a timm backbone (``efficientnet_lite*``, ``timm:*``) pools its last feature map: average,
    maximum, or the mean of the two (``avgmax``, the average plus max pooling of many metric-learning
    papers' code)."""

    @property
    def has_embedder(self) -> bool:
        """Whether the head has an embedder (``embedding``, ``both``); else the features are the vectors."""
        return self.head in ("embedding", "both")


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


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"
    """``auto``: what this machine runs fastest (bf16-mixed on a GPU with bf16 or a CPU with native
    bf16, 16-mixed on other GPUs, else 32), decided where the run runs; inference always uses ``auto``."""
    channels_last: bool = False
    grad_clip: float | None = Field(None, gt=0)
    mixup: float = Field(0.0, ge=0)
    """Classification: mixup's alpha (0: off). With ``cutmix`` too, each batch uses one of the two."""
    cutmix: float = Field(0.0, ge=0)
    """Classification: CutMix's alpha (0: off)."""
    head_epochs: int = Field(0, ge=0)
    """Two-stage fine-tuning: train only the head for this many epochs first."""
    ema_decay: float = Field(0.0, ge=0, lt=1)
    """An exponential moving average of the weights, updated after every step with this decay (for
    example 0.99 for a horizon of about 100 steps), validates, is checkpointed and is the trained model
    (Lightning's ``EMAWeightAveraging``). 0 (default): off."""
    frozen_cache_views: int = Field(0, ge=0)
    """With ``model.freeze_stages``: compute the frozen stem and stages once, at the start of training,
    for N views of every training image (0: the image at ``data.image_size``, 1: its mirror, 2 to N-1:
    seeded ``data.augment`` draws), keep them in memory as float16 (images x N x the frozen output's
    size x 2 bytes), and train the rest of the model on them: each epoch every image comes as one
    random view, its feature map randomly cropped to 75-100% of its height and width. Steps skip the
    frozen forward pass; augmentation is limited to those N views, and ``mixup`` / ``cutmix`` mix the
    cached maps (as manifold mixup does). Validation and testing use images. 0 (default): off. Not
    with head_epochs."""
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
    export_onnx: bool = False
    """``finegrain train`` exports the trained model to ONNX (``RUN/export``, as ``finegrain export``
    does) before its evaluation, which then runs on ONNX Runtime: about twice as fast on a CPU, and
    index, search and serve use the export too."""


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

    @model_validator(mode="after")
    def _mixing_classifies(self) -> ExperimentConfig:
        t = self.train
        for key, value in (("mixup", t.mixup), ("cutmix", t.cutmix)):
            if value > 0 and self.task != "classification":
                raise ConfigError(
                    f"train.{key} ({value:g}) mixes the images and labels of a classifier's batch; "
                    f"task {self.task} does not use it: set train.{key} to 0"
                )
        return self

    @model_validator(mode="after")
    def _frozen_cache_fits(self) -> ExperimentConfig:
        # a ConfigError (not a ValueError) leaves pydantic as it is: one clear line wherever configs are validated
        n, t = self.train.frozen_cache_views, self.train
        if not n:
            return self
        if self.model.freeze_stages < 1:
            raise ConfigError(
                f"train.frozen_cache_views: {n} caches the outputs of the frozen stages, but "
                "model.freeze_stages is 0: set model.freeze_stages to 1 or more, or "
                "train.frozen_cache_views to 0"
            )
        if t.head_epochs > 0:
            raise ConfigError(
                f"train.frozen_cache_views cannot be combined with train.head_epochs "
                f"({t.head_epochs}): the head-only epochs change what of the backbone trains; "
                "set train.head_epochs or train.frozen_cache_views to 0"
            )
        return self

    @model_validator(mode="after")
    def _progressive_sizes_fit(self) -> ExperimentConfig:
        stages, t = self.data.progressive_sizes, self.train
        if not stages:
            return self
        for h, w, n in stages:
            if min(h, w) < 8 or n < 1:
                raise ConfigError(
                    f"data.progressive_sizes: the stage {[h, w, n]} needs a height and width of "
                    "8 or more and 1 epoch or more"
                )
        early = sum(n for _, _, n in stages)
        if early >= t.epochs:
            raise ConfigError(
                f"data.progressive_sizes: its stages take {early} epoch(s) of train.epochs ({t.epochs}), "
                f"so none would train at data.image_size {list(self.data.image_size)}: shorten the "
                "stages or raise train.epochs"
            )
        if t.frozen_cache_views:
            raise ConfigError(
                "data.progressive_sizes cannot be combined with train.frozen_cache_views "
                f"({t.frozen_cache_views}): the cache holds the frozen stages' outputs at one image "
                "size; set one of them to 0 / []"
            )
        return self

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


def eval_sizes(data: DataConfig) -> list[tuple[int, int]]:
    """The (height, width) sizes images are evaluated, embedded and searched at (outputs averaged)."""
    return list(data.eval_image_sizes) or [data.image_size]
