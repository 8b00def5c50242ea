from dataclasses import dataclass, field
from typing import Tuple

import pytest
import yaml

from shared import config as C


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.5, 0.9)


@dataclass(frozen=True)
class Cfg:
    name: str = "base"
    ch_mult: Tuple[int, ...] = (1, 2)
    depth: int = 2
    optim: Optim = field(default_factory=Optim)


PRESETS = {"small": Cfg(name="small", depth=1), "big": Cfg(name="big", ch_mult=(1, 1, 2, 2, 4), depth=4)}


def test_preset_and_overrides():
    cfg = C.resolve(Cfg, PRESETS, "big", ["optim.lr=3e-4", "ch_mult=[1,2,4]", "depth=7"])
    assert cfg == Cfg(name="big", ch_mult=(1, 2, 4), depth=7, optim=Optim(lr=3e-4))
    assert isinstance(cfg.ch_mult, tuple) and isinstance(cfg.optim.betas, tuple)
    with pytest.raises(Exception):
        cfg.depth = 3  # frozen
    hash(cfg)


def test_unknown_key_and_bad_type_are_errors():
    with pytest.raises(C.ConfigError, match="nope"):
        C.resolve(Cfg, PRESETS, "small", ["nope=1"])
    with pytest.raises(C.ConfigError, match="lrr"):
        C.resolve(Cfg, PRESETS, "small", ["optim.lrr=1"])
    with pytest.raises(C.ConfigError):
        C.resolve(Cfg, PRESETS, "small", ["depth=deep"])
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.resolve(Cfg, PRESETS, "medium", [])
    with pytest.raises(C.ConfigError, match="key=value"):
        C.resolve(Cfg, PRESETS, "small", ["depth"])


def test_yaml_file_with_preset_base(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"preset": "big", "depth": 9, "optim": {"lr": 0.5}}))
    cfg = C.resolve(Cfg, PRESETS, str(f), ["name=x"])
    assert cfg == Cfg(name="x", ch_mult=(1, 1, 2, 2, 4), depth=9, optim=Optim(lr=0.5))
    bad = tmp_path / "bad.yaml"
    bad.write_text("depth: 1\nwidth: 3\n")
    with pytest.raises(C.ConfigError, match="width"):
        C.resolve(Cfg, PRESETS, str(bad), [])
    with pytest.raises(C.ConfigError, match="not found"):
        C.resolve(Cfg, PRESETS, str(tmp_path / "missing.yaml"), [])


def test_saved_config_round_trips(tmp_path):
    cfg = C.resolve(Cfg, PRESETS, "big", ["optim.betas=[0.9,0.95]"])
    C.save_config(cfg, tmp_path / "config.yaml")
    assert C.resolve(Cfg, PRESETS, str(tmp_path / "config.yaml"), []) == cfg
    assert C.from_dict(Cfg, C.to_dict(cfg)) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp files left


def test_cli_shape():
    import argparse

    p = argparse.ArgumentParser()
    C.add_config_args(p)
    args = p.parse_args(["--config", "small", "depth=3", "optim.lr=0.1"])
    assert C.from_args(Cfg, PRESETS, args) == Cfg(name="small", depth=3, optim=Optim(lr=0.1))
