"""Frozen dataclass configs: named presets, YAML files and ``key=value`` overrides, checked by OmegaConf.

Every entry point takes the same shape of command line:

    python -m stage2_ar.train --config ar-B optim.lr=3e-4 data.batch_size=24

``--config`` names a preset or a YAML file (a YAML file may start from a preset with ``preset: NAME`` and
override part of it). Unknown keys and wrongly typed values are errors, never silently ignored. The resolved
config is saved next to every run's outputs (``save_config``) and inside every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Type, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shared import atomic

C = TypeVar("C")
PRESET_KEY = "preset"


class ConfigError(ValueError):
    """A config that names an unknown preset or key, or gives a value of the wrong type."""


def _tuplify(obj: Any) -> Any:
    """OmegaConf hands lists back for tuple fields; frozen configs want hashable tuples."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            nv = tuple(_tuplify(x) for x in v) if isinstance(v, list) else _tuplify(v)
            if nv is not v:
                changes[f.name] = nv
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _writable(node: Any) -> None:
    """Frozen dataclasses give read-only nodes at every level; merging needs them writable (struct stays on)."""
    if isinstance(node, (DictConfig, ListConfig)):
        node._set_flag("readonly", None)
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            _writable(node._get_node(key))


def merge(base: C, *layers: Any) -> C:
    """Merge dicts / OmegaConf nodes onto a dataclass instance, strictly, and return a new instance."""
    try:
        node = OmegaConf.structured(base)
        _writable(node)
        for layer in layers:
            if layer is None:
                continue
            node = OmegaConf.merge(node, layer)
        return _tuplify(OmegaConf.to_object(node))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config for {type(base).__name__}: {_one_line(e)}") from None


def resolve(
    cls: Type[C],
    presets: Mapping[str, C],
    spec: Optional[str] = None,
    overrides: Sequence[str] = (),
) -> C:
    """Build a config from a preset name or YAML path, then ``key=value`` overrides."""
    yaml_layer = None
    if spec is None:
        base = cls()
    elif spec in presets:
        base = presets[spec]
    elif spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"config file not found: {spec}")
        try:
            yaml_layer = OmegaConf.load(path)
        except Exception as e:
            raise ConfigError(f"cannot parse {spec}: {_one_line(e)}") from None
        name = yaml_layer.pop(PRESET_KEY, None) if isinstance(yaml_layer, Mapping) else None
        if name is not None and name not in presets:
            raise ConfigError(f"{spec}: unknown preset {name!r}; choose from {', '.join(sorted(presets))}")
        base = presets[name] if name is not None else cls()
    else:
        raise ConfigError(f"unknown preset {spec!r}; choose from {', '.join(sorted(presets))} or give a .yaml file")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    try:
        dot = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {_one_line(e)}") from None
    return merge(base, yaml_layer, dot)


def to_dict(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(cls: Type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a config saved with ``to_dict`` (e.g. from a checkpoint's config.json), strictly."""
    return merge(cls(), dict(data))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: Path) -> None:
    atomic.write_text(path, to_yaml(cfg))


def add_config_args(parser: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    parser.add_argument("--config", default=default, help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")


def from_args(cls: Type[C], presets: Mapping[str, C], args: argparse.Namespace) -> C:
    return resolve(cls, presets, args.config, args.overrides)
