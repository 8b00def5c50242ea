"""The run settings every trainer shares, defined (and documented) once: same key, same meaning, both stages.

Each stage's ``TrainConfig`` inherits these fields and adds its own; a preset may change their defaults.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Sequence

from shared.config import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
TRACKERS = ("none", "wandb")
WANDB_MODES = ("", "online", "offline")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases settings, used with ``tracker=wandb`` (``shared.runlog.RunLogger``)."""
    project: str = ""                  # required with tracker=wandb
    entity: str = ""                   # team or user (default: the logged-in account's)
    name: str = ""                     # run name (default: out_dir's last part)
    mode: str = ""                     # online | offline (default: WANDB_MODE, else online)


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/run"          # config.yaml, metrics.jsonl, tb/, images/, step-NNNNNNNN/ checkpoints
    seed: int = 0
    device: str = "auto"               # auto | cuda | npu | cpu
    precision: str = "fp32"            # fp32 | bf16 | fp16 (autocast; weights and optimiser states stay fp32)
    resume: str = "auto"               # auto: newest step-* in out_dir (or fresh); never: fresh; or a step-* dir
    stop_after: int = 0                # > 0: leave after this many steps of this invocation, with a checkpoint
    ckpt_every: int = 1000             # checkpoint every N optimiser steps (and at the end)
    keep_last: int = 3                 # keep the newest N step-* checkpoints; 0 keeps all
    log_every: int = 10                # metrics every N steps: the only steps that wait for the device
    tensorboard: bool = True
    tracker: str = "none"              # none | wandb: also log the scalars and images to W&B (wandb.* below)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    threads: int = 0                   # > 0: torch.set_num_threads (CPU runs)
    compile: bool = False              # torch.compile the model's blocks (Stage 2) / encoder + decoder (Stage 1)


def check_run_config(cfg: RunConfig, precisions: Sequence[str] = PRECISIONS) -> None:
    """Refuse run settings that would fail later or silently mean something else."""
    if cfg.precision not in precisions:
        raise ConfigError(f"precision must be one of {', '.join(precisions)}, got {cfg.precision!r}")
    if cfg.resume in ("", None):
        raise ConfigError("resume must be auto, never or a checkpoint directory, got ''")
    for name in ("ckpt_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("stop_after", "keep_last", "threads"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.out_dir:
        raise ConfigError("out_dir is required")
    check_tracker(cfg)


def check_tracker(cfg: RunConfig) -> None:
    """``tracker`` and ``wandb.*``: known values, a project, and the package installed (checked without
    importing it: nothing heavy before the run starts)."""
    if cfg.tracker not in TRACKERS:
        raise ConfigError(f"tracker must be one of {', '.join(TRACKERS)}, got {cfg.tracker!r}")
    if cfg.tracker != "wandb":
        return
    if not cfg.wandb.project:
        raise ConfigError("tracker=wandb needs wandb.project=NAME")
    if cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode must be online or offline (or empty for WANDB_MODE), got {cfg.wandb.mode!r}")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("tracker=wandb needs the wandb package, which is not installed: pip install wandb "
                          "(or the project's dev extra), or use tracker=none")
