"""Experiment configuration: typed models, YAML loading, profiles and dotted overrides.

A config file is YAML whose keys mirror :class:`ExperimentConfig`. Two extra
top-level keys are handled before validation:

- ``extends: other.yaml`` — start from another file (relative to this one) and
  deep-merge this file over it;
- ``profiles: {quick: {...}}`` — named override sets, applied with ``--profile``.

Every key is checked: an unknown or misspelt key raises :class:`ConfigError`
naming the key and the closest valid one.

The sections live in :mod:`~finegrain.config.schema`, the losses' settings in
:mod:`~finegrain.config.losses`, reading and resolving files in :mod:`~finegrain.config.files`;
this module offers them all under one name. (The shipped YAML files are package data in
``finegrain/configs/``, a different folder.)
"""

from __future__ import annotations

from finegrain.config.bounded_yaml import MAX_YAML_NODES, load_yaml
from finegrain.config.files import (
    CONFIG_DIR,
    DATA_ENV,
    META_KEYS,
    REQUIRED_KEYS,
    build_config,
    check_keys,
    config_to_yaml,
    data_override,
    deep_merge,
    format_validation_error,
    load_config,
    load_raw,
    missing_required_keys,
    parse_override,
    profiles_of,
    read_yaml,
    resolve_config_path,
    resolve_data_root,
    shipped_configs,
)
from finegrain.config.losses import (
    LOSS_CONFIGS,
    ArcFaceLoss,
    ContrastiveLoss,
    CrossEntropyLoss,
    LossConfig,
    MultiSimilarityLoss,
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
    TripletLoss,
    loss_model,
    migrate_stored,
)
from finegrain.config.schema import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    SyntheticConfig,
    TrainConfig,
)
from finegrain.config.section import Section
from finegrain.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "DATA_ENV",
    "LOSS_CONFIGS",
    "MAX_YAML_NODES",
    "META_KEYS",
    "REQUIRED_KEYS",
    "ArcFaceLoss",
    "ConfigError",
    "ContrastiveLoss",
    "CrossEntropyLoss",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "MultiSimilarityLoss",
    "NormalizedSoftmaxLoss",
    "OptimConfig",
    "ProxyAnchorLoss",
    "ScheduleConfig",
    "Section",
    "SyntheticConfig",
    "TrainConfig",
    "TripletLoss",
    "build_config",
    "check_keys",
    "config_to_yaml",
    "data_override",
    "deep_merge",
    "format_validation_error",
    "load_config",
    "load_raw",
    "load_yaml",
    "loss_model",
    "migrate_stored",
    "missing_required_keys",
    "parse_override",
    "profiles_of",
    "read_yaml",
    "resolve_config_path",
    "resolve_data_root",
    "shipped_configs",
]
