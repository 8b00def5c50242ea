"""Checkpoint I/O: safetensors weights + JSON config (+ trainer state), atomic, loaded strictly.

A checkpoint is a directory:
    model.safetensors    weights (no pickle, cannot execute code)
    config.json          {"format": 1, "kind": ..., "config": {...}, "extra": {...}}
    trainer_state.pt     optional: optimizer/scheduler/step/RNG state, read with weights_only=True

The directory is written under a temporary name and renamed into place, so a crash mid-write never leaves
a directory that looks complete; a full disk is ``shared.atomic.DiskFullError``, one line naming the
checkpoint (torch.save's "unexpected pos N vs M" included), with the temporary directory removed. An existing directory is replaced only if it is a checkpoint of the same
kind (recognised by its config.json) or empty, unless ``overwrite=True``: a tool never replaces what it did
not make (``check_checkpoint_output`` runs the same test before any work).

Legacy ``.ckpt``/``.pt`` files (e.g. the official Lightning checkpoints) are read by
``shared.legacy_checkpoint``: tensors come out, any other object stays an inert record, no code ever runs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file

from shared.atomic import PathLike, atomic_dir, check_output_dir
from shared.progress import progress
from shared.safetensors_writer import tensor_bytes, write_safetensors

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


def is_checkpoint(path: PathLike, kind: str) -> bool:
    """Whether ``path`` holds a checkpoint of ``kind`` by its config.json (this project's product)."""
    try:
        meta = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION and meta.get("kind") == kind


def _replace_if(kind: str, overwrite: bool) -> Callable[[Path], bool]:
    """Which existing directory a ``kind`` checkpoint may replace: one of the same kind (or any, ``overwrite``)."""
    return (lambda p: True) if overwrite else (lambda p: is_checkpoint(p, kind))


def _product(kind: str) -> str:
    return f"a {kind!r} checkpoint directory"


def check_checkpoint_output(path: PathLike, kind: str, *, overwrite: bool = False) -> Path:
    """Before any work: refuse an output that ``save_checkpoint(path, kind=kind)`` would refuse to replace
    (a file, an unwritable place, a non-empty directory that is not a ``kind`` checkpoint); one-line
    ``shared.atomic.OutputError``."""
    return check_output_dir(path, owned=_replace_if(kind, overwrite), what=_product(kind))


def save_checkpoint(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Any = None,
    *,
    kind: str,
    trainer_state: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> Path:
    """Write a checkpoint directory atomically and return its path (``OutputError`` if ``path`` holds
    something else than a ``kind`` checkpoint, unless ``overwrite``). ``show_progress``: a progress bar with
    ETA over the weights' bytes (the converters: GBs for the large released models)."""
    path = Path(path)
    meta = {"format": FORMAT_VERSION, "kind": kind, "config": _config_dict(config), "extra": extra or {}}
    with atomic_dir(path, replace_if=_replace_if(kind, overwrite), what=_product(kind)) as tmp:
        weights = _detached(state_dict)
        with progress(desc=f"writing {path.name}/{WEIGHTS}", total=tensor_bytes(weights), unit="B", unit_scale=True,
                      disable=not show_progress) as bar:
            write_safetensors(tmp / WEIGHTS, weights, metadata={"kind": kind}, tick=bar.update)
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
    f = _require(path, CONFIG)
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # unreadable, truncated, not JSON or not UTF-8
        raise CheckpointError(f"{f} is damaged or unreadable ({error_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    if not isinstance(meta.get("kind"), str) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{f} is damaged: no kind or config")
    return meta


def error_line(e: BaseException, lines: int = 1) -> str:
    """The exception's type and the first ``lines`` lines of its message, as one line (CLI errors are one line)."""
    text = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()][:lines]
    return f"{type(e).__name__}: {' '.join(text)}".rstrip(": ")


def load_state_dict(path: PathLike, device: str = "cpu") -> Dict[str, torch.Tensor]:
    f = _require(Path(path), WEIGHTS)
    try:
        return load_file(str(f), device=device)
    except Exception as e:  # truncated or not a safetensors file: safetensors raises its own error types
        raise CheckpointError(f"{f} is damaged or not a safetensors file ({error_line(e)})") from None


def load_trainer_state(path: PathLike) -> Optional[Dict[str, Any]]:
    f = Path(path) / TRAINER_STATE
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused global (a pickle carrying code) or a damaged file
        raise CheckpointError(f"refusing {f}: damaged, or not plain tensors and containers ({error_line(e)})") from None


def read_checkpoint(path: PathLike, *, kind: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(meta, weights) of a checkpoint, refusing one of another ``kind``."""
    meta = load_meta(path)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, expected {kind!r}")
    return meta, load_state_dict(path)


def load_weights(module: torch.nn.Module, path: PathLike, *, kind: Optional[str] = None) -> Dict[str, Any]:
    """Load a checkpoint into ``module`` strictly (every key present, no extra, same shapes); return meta."""
    meta, state_dict = read_checkpoint(path, kind=kind)
    load_strict(module, state_dict, source=str(path))
    return meta


def check_matches(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """The keys and shapes of ``state_dict`` are exactly ``module``'s, or a one-line ``CheckpointError``."""
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


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """``load_state_dict(strict=True)`` with shape checks and a one-line, readable error."""
    check_matches(module, state_dict, source)
    module.load_state_dict(state_dict, strict=True)


def load_legacy(path: PathLike) -> Any:
    """Read a pickle-based ``.ckpt``/``.pt`` file safely (``shared.legacy_checkpoint.load``): tensors, plain
    containers and inert records of every other object; never code."""
    from shared.legacy_checkpoint import load

    return load(path)


def state_dict_of(ckpt: object) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a legacy file (``load_legacy``): Lightning's ['state_dict'], or the file itself."""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("not an official checkpoint: no dict of tensors (under 'state_dict')")
    return sd
