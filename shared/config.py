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
import difflib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

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


def known_keys(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    """Every dotted key of a config instance (nested dataclasses walked) -> its value there."""
    keys: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys[prefix + f.name] = value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            keys.update(known_keys(value, prefix + f.name + "."))
    return keys


def _layer_keys(layer: Any, cfg: Any, prefix: str = "") -> list:
    """The dotted keys a dict / OmegaConf layer sets, descending only where ``cfg`` has a nested config."""
    keys = []
    fields = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set()
    for k, v in layer.items():
        key = prefix + str(k)
        nested = getattr(cfg, str(k)) if str(k) in fields else None
        if isinstance(v, Mapping) and (dataclasses.is_dataclass(nested) or str(k) not in fields):
            keys.extend(_layer_keys(v, nested, key + "."))
        else:
            keys.append(key)
    return keys


def suggest(key: str, known: Sequence[str]) -> Optional[str]:
    """The known key closest to ``key``: the same last part elsewhere (``lr`` -> ``optim.lr``), else the
    closest spelling of the whole dotted key, else of its last part."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return min(same_leaf, key=len)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in sorted(known, key=len, reverse=True)}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[close[0]] if close else None


def check_keys(base: Any, layer: Any) -> None:
    """Refuse a key ``base`` does not have, in one line naming the closest known key."""
    if layer is None or not isinstance(layer, (Mapping, DictConfig)):
        return
    known = known_keys(base)
    for key in _layer_keys(layer, base):
        if key not in known:
            hint = suggest(key, list(known))
            raise ConfigError(f"unknown key {key!r} for {type(base).__name__}"
                              + (f" (did you mean {hint!r}?)" if hint else ""))


def merge(base: C, *layers: Any) -> C:
    """Merge dicts / OmegaConf nodes onto a dataclass instance, strictly, and return a new instance."""
    for layer in layers:
        check_keys(base, layer)
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


def presets_help(presets: Mapping[str, Any], default: Optional[str] = None) -> str:
    """The epilog of a command with a config: its presets and how to see every key."""
    names = ", ".join(f"{n} (default)" if n == default else n for n in presets)
    return (f"presets: {names}\n"
            f"--config also takes a YAML file, which may start from a preset with '{PRESET_KEY}: NAME'.\n"
            "key=value overrides any key, dotted for nested ones (e.g. optim.lr=1e-4).\n"
            "--print-config prints the resolved config (preset + YAML + overrides): every key and its value.")


def add_config_args(parser: argparse.ArgumentParser, default: Optional[str] = None,
                    presets: Optional[Mapping[str, Any]] = None) -> None:
    """``--config``, ``--print-config`` and the ``key=value`` overrides; with ``presets`` the help lists them."""
    choices = f": {', '.join(presets)}" if presets else ""
    parser.add_argument("--config", default=default, help=f"preset name{choices}; or a YAML file (default: {default})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit, without starting anything")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    if presets:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = presets_help(presets, default)


def from_args(cls: Type[C], presets: Mapping[str, C], args: argparse.Namespace) -> C:
    return resolve(cls, presets, args.config, args.overrides)


def _named(run: Any) -> Any:
    """``run`` itself, or the object a ``"package.module:name"`` string names (imported only now)."""
    if not isinstance(run, str):
        return run
    import importlib

    module, _, name = run.partition(":")
    return getattr(importlib.import_module(module), name)


def train_main(
    argv: Optional[List[str]],
    *,
    prog: str,
    doc: str,
    config_cls: Type,
    presets: Mapping[str, Any],
    default: str,
    run: Union[str, Callable[[Any], int]],
    errors: Tuple[Union[str, Type[BaseException]], ...] = (),
) -> int:
    """The command line of every trainer: ``--config PRESET|FILE [--print-config] key=value ...``.

    Parsing, ``--help`` and ``--print-config`` import nothing heavy: ``run`` (and each of ``errors``, the
    exceptions reported as one line) may be a ``"module:name"`` string, imported once the config is resolved.
    Bad input is one line and a non-zero exit."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip().split("\n")[0])
    add_config_args(parser, default=default, presets=presets)
    args = parser.parse_args(argv)
    try:
        cfg = from_args(config_cls, presets, args)
    except ConfigError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from shared.checkpoint import CheckpointError  # the heavy imports start here, after the command line

    try:
        if getattr(cfg, "threads", 0) > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        return _named(run)(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, *map(_named, errors)) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
