"""A run directory's checkpoints: ``step-NNNNNNNN/`` written atomically, pruned atomically, found for resume.

Only complete checkpoints ever carry a ``step-*`` name: a checkpoint is written as a hidden temporary
directory and renamed into place (``shared.checkpoint.save_checkpoint``), and pruning renames a checkpoint to a
hidden ``.step-*.trash-PID`` name before deleting it. A kill at any instant therefore leaves at most hidden
leftovers, which ``clean_leftovers`` removes at the next start; it touches nothing but names of that shape.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from shared import collectives
from shared.atomic import PathLike
from shared.checkpoint import CONFIG, TRAINER_STATE, WEIGHTS, save_checkpoint
from shared.config import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")
# What save_checkpoint (via shared.atomic.atomic_dir) and prune leave behind when killed mid-way.
_LEFTOVER = re.compile(r"^\.step-\d+\.(?:.+\.tmp|old-\d+|trash-\d+)$")


def step_dir(run_dir: PathLike, step: int) -> Path:
    return Path(run_dir) / f"step-{step:08d}"


def is_complete(path: PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def step_dirs(run_dir: PathLike) -> List[Path]:
    """Complete checkpoints ``run_dir/step-NNNNNNNN``, sorted by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def clean_leftovers(run_dir: PathLike) -> List[Path]:
    """Remove the hidden temporary / half-pruned checkpoint directories a kill left; return what was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    gone = [p for p in run_dir.iterdir() if _LEFTOVER.match(p.name) and p.is_dir() and not p.is_symlink()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def prune(run_dir: PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all), each by rename first, then removal."""
    if keep_last <= 0:
        return
    for p in step_dirs(run_dir)[:-keep_last]:
        trash = p.parent / f".{p.name}.trash-{os.getpid()}"
        os.replace(p, trash)  # from here on it is no longer a checkpoint, whatever happens to the removal
        shutil.rmtree(trash, ignore_errors=True)


def find_resume(spec: str, run_dir: PathLike) -> Optional[Path]:
    """``resume=auto`` (newest checkpoint in ``run_dir``, or none), ``never`` (none) or a checkpoint path."""
    if spec == "never":
        return None
    if spec == "auto":
        found = step_dirs(run_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"resume={spec}: no such checkpoint directory (use auto, never or a step-* directory)")
    missing = [n for n in (CONFIG, WEIGHTS, TRAINER_STATE) if not (path / n).is_file()]
    if missing:
        raise ConfigError(f"resume={spec} is not a training checkpoint: {', '.join(missing)} missing")
    return path


def save_training_checkpoint(
    run_dir: PathLike,
    step: int,
    *,
    kind: str,
    weights: Callable[[], Mapping[str, torch.Tensor]],
    trainer_state: Callable[[], Dict[str, Any]],
    per_rank: Any,
    config: Any,
    keep_last: int,
    is_main: bool,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Collective: every rank hands in its own ``per_rank`` state (RNG, data position); rank 0 writes
    ``step-NNNNNNNN`` with ``trainer_state() | {"step", "world_size", "ranks"}``, prunes, and all ranks wait."""
    ranks = collectives.gather_objects(per_rank)
    path = step_dir(run_dir, step)
    if is_main:
        state = {**trainer_state(), "step": step, "world_size": len(ranks), "ranks": ranks}
        save_checkpoint(path, weights(), config, kind=kind, trainer_state=state, extra={"step": step, **(extra or {})})
        prune(run_dir, keep_last)
    collectives.barrier()
    return path
