"""Checkpoint I/O: safetensors weights + JSON config (+ trainer state), atomic, loaded strictly.

A checkpoint is a directory:
    model.safetensors    weights (no pickle, cannot execute code)
    config.json          {"format": 1, "kind": ..., "config": {...}, "extra": {...}}
    trainer_state.pt     optional: optimizer/scheduler/step/RNG state, read with weights_only=True

The directory is written under a temporary name and renamed into place, so a crash mid-write never leaves
a directory that looks complete. Legacy ``.ckpt``/``.pt`` files (e.g. the official Lightning checkpoints)
are read with ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from shared.atomic import PathLike, atomic_dir

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, malformed, or does not match the model it is loaded into."""


def _config_dict(config: Any) -> Dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


def _detached(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_checkpoint(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Any = None,
    *,
    kind: str,
    trainer_state: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path."""
    path = Path(path)
    meta = {"format": FORMAT_VERSION, "kind": kind, "config": _config_dict(config), "extra": extra or {}}
    with atomic_dir(path) as tmp:
        save_file(_detached(state_dict), str(tmp / WEIGHTS), metadata={"kind": kind})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    return path


def _require(path: Path, name: str) -> Path:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: {name} is missing")
    return f


def load_meta(path: PathLike) -> Dict[str, Any]:
    """The config.json of a checkpoint: format, kind, config and extra."""
    path = Path(path)
    meta = json.loads(_require(path, CONFIG).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    return meta


def load_state_dict(path: PathLike, device: str = "cpu") -> Dict[str, torch.Tensor]:
    return load_file(str(_require(Path(path), WEIGHTS)), device=device)


def load_trainer_state(path: PathLike) -> Optional[Dict[str, Any]]:
    f = Path(path) / TRAINER_STATE
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def load_weights(module: torch.nn.Module, path: PathLike, *, kind: Optional[str] = None) -> Dict[str, Any]:
    """Load a checkpoint into ``module`` strictly (every key present, no extra, same shapes); return meta."""
    meta = load_meta(path)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, expected {kind!r}")
    load_strict(module, load_state_dict(path), source=str(path))
    return meta


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """``load_state_dict(strict=True)`` with shape checks and a one-line, readable error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def load_legacy(path: PathLike) -> Any:
    """Read a pickle-based ``.ckpt``/``.pt`` file safely: tensors and plain containers only, never code."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's message names the refused global
        raise CheckpointError(f"refusing to load {path}: not a plain tensor checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e


_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(run_dir: PathLike) -> list[Path]:
    """Complete checkpoints ``run_dir/step-NNNNNNNN`` sorted by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / CONFIG).is_file()]
    return [p for _, p in sorted(found)]


def step_dir(run_dir: PathLike, step: int) -> Path:
    return Path(run_dir) / f"step-{step:08d}"


def prune(run_dir: PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints."""
    for p in step_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
