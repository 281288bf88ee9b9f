"""Config files: YAML reading, ``extends``, profiles, ``--set`` overrides, key checks, validation,
and the configs shipped with the package."""

from __future__ import annotations

import json
import os
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finegrain.config.bounded_yaml import load_yaml
from finegrain.config.losses import loss_model
from finegrain.config.schema import ExperimentConfig
from finegrain.errors import ConfigError, did_you_mean

META_KEYS = ("extends", "profiles")


def deep_merge(base: dict, over: dict) -> dict:
    """A new dict: ``over`` merged into ``base`` recursively (dicts merge, the rest replaces)."""
    out = dict(base)
    for k, v in over.items():
        if (
            k == "loss"
            and isinstance(v, dict)
            and isinstance(out.get(k), dict)
            and v.get("name", out[k].get("name")) != out[k].get("name")
        ):
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
        data = load_yaml(text)
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
            hint = did_you_mean(str(key), fields, cutoff=0.5, prefix=where)
            valid = ", ".join(fields)
            raise ConfigError(f"unknown config key '{dotted}'.{hint} (valid keys here: {valid})")
        sub = fields[key].annotation
        if model is ExperimentConfig and key == "loss" and isinstance(value, dict):
            sub = loss_model(value.get("name", "cross_entropy"))
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            check_keys(value, sub, dotted + ".")


def parse_override(item: str) -> dict:
    """``"train.lr=0.01"`` → ``{"train": {"lr": 0.01}}`` (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def data_override(path: Path) -> str:
    """``data.root=PATH`` as a ``--set`` value for a ``--data`` option: absolute (the run is opened from
    anywhere) and quoted (a folder named ``2024`` or ``yes`` stays a path)."""
    return "data.root=" + json.dumps(str(path.expanduser().absolute()))


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
    if missing == ["data.root"]:
        raise ConfigError(
            f"{source.stem} needs your images: give --data PATH (a folder of class sub-folders, with train/ and "
            "test/ sub-folders if you have a test split, or a CSV list path,label[,split]), or --set data.root=PATH"
        )
    if missing:
        raise ConfigError(
            f"config {source} does not set {', '.join(missing)}: a config must name its run (name), "
            "its images (data.root: a dataset folder, a CSV file or 'synthetic') and its model "
            "(model.backbone; a kNN row may use eval.source_run's model instead); add "
            f"{'it' if len(missing) == 1 else 'them'} to the file or pass --set KEY=VALUE"
        )
    root = resolve_data_root(cfg.data.root, source.stem)
    return cfg if root == cfg.data.root else cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": root})})


DATA_ENV = "FINEGRAIN_DATA"
"""The environment variable the shipped dataset configs read their data folder from
(``data.root: ${FINEGRAIN_DATA}/stanford_cars``) when ``--data`` does not say."""
_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}")


def resolve_data_root(root: str, config: str) -> str:
    """``data.root`` with every ``${NAME}`` replaced by that environment variable; a ConfigError in one
    line, naming ``--data`` and the variable, when one is unset."""
    unset = [n for n in _ENV_REFERENCE.findall(root) if not os.environ.get(n)]
    if unset:
        rest = _ENV_REFERENCE.sub("", root).lstrip("/") or "the dataset"
        raise ConfigError(
            f"{config} reads its images from {root}: give --data PATH (the {rest} folder) or set "
            f"{unset[0]} to the folder that holds {rest}/"
        )
    return _ENV_REFERENCE.sub(lambda m: os.environ[m.group(1)], root)


REQUIRED_KEYS = ("name", "data.root", "model.backbone")
"""Keys a config file must set explicitly (``model.backbone`` or, for ``task: knn``, ``eval.source_run``)."""


def missing_required_keys(
    raw: dict, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> list[str]:
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


def _short_repr() -> reprlib.Repr:
    """Quotes a value in an error within a line: never the repr of a whole input."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 2, 60, 60
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 4
    return r


_SHORT = _short_repr()

MAX_ERRORS_SHOWN = 5


def format_validation_error(e: ValidationError) -> str:
    """One line per problem (the first few), each quoting at most a short part of the value."""
    lines = []
    errors = e.errors(include_url=False, include_context=False)
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = f" (got {_SHORT.repr(got)})" if not isinstance(got, dict) else ""
        lines.append(f"config key '{loc}': {err['msg']}{shown}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more")
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
    hint = did_you_mean(str(name), shipped_configs())
    raise ConfigError(f"config not found: '{name}' is neither a file nor a shipped config in {CONFIG_DIR}.{hint}")
