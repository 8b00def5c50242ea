"""Run logging: JSONL metrics, TensorBoard scalars, PNG image grids, progress (``shared.progress``) on rank 0."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from PIL import Image

from shared import atomic
from shared.images import to_uint8_nhwc


_RANK: Optional[int] = None  # set once the process group is known (shared.device.init_distributed)


def set_rank(rank: int) -> None:
    """Label and filter this process's log lines as ``rank`` (called once torch.distributed is set up)."""
    global _RANK
    _RANK = int(rank)


def current_rank() -> int:
    """This process's rank, asked when a line is logged, not when the logger was made: the one
    ``set_rank`` was given, else torch.distributed's once initialised, else torchrun's RANK (0 alone)."""
    if _RANK is not None:
        return _RANK
    dist = sys.modules.get("torch.distributed")  # never imported here just to log
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _rank_filter(record: logging.LogRecord) -> bool:
    """Rank 0 logs the run's lines; the other ranks only their own warnings and errors."""
    record.rank = current_rank()
    return record.rank == 0 or record.levelno >= logging.WARNING


class _Stderr(logging.StreamHandler):
    """A handler writing to the ``sys.stderr`` of the moment (a redirected or captured one too)."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def get_logger(name: str, rank: Optional[int] = None) -> logging.Logger:
    """A stderr logger whose lines carry the process's real rank (``[rank1]``), looked up per line: it may be
    made at import, before the process group exists. Ranks other than 0 only report warnings and errors.
    ``rank``: set this process's rank now (as ``set_rank``)."""
    if rank is not None:
        set_rank(rank)
    log = logging.getLogger(name)
    if not log.handlers:
        h = _Stderr()
        h.setFormatter(logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.addFilter(_rank_filter)
        log.propagate = False
    log.setLevel(logging.INFO)
    return log


def progress(iterable: Optional[Iterable] = None, rank: int = 0, **kwargs):
    """``shared.progress.progress`` (a bar on a terminal, plain lines with an ETA in a log) on rank 0, silent
    elsewhere."""
    from shared.progress import progress as _progress

    return _progress(iterable, rank=rank, **kwargs)


def image_grid(images: Union[torch.Tensor, np.ndarray], nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """Tile images into one uint8 HWC array, ``nrow`` images per row.

    ``images``: (B, C, H, W) floats in [-1, 1] (converted by ``shared.images.to_uint8``), or (B, H, W, C)
    uint8 already converted (no second float round trip).
    """
    arr = images if isinstance(images, np.ndarray) and images.dtype == np.uint8 else to_uint8_nhwc(images)
    b, h, w, c = arr.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: Path, text: Optional[Mapping[str, str]] = None) -> None:
    """Write an (H, W, C) uint8 image atomically; ``text``: PNG text chunks (key -> value), e.g. provenance."""
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
    with atomic.atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


WANDB_ID_FILE = "wandb-run-id"  # in out_dir: a resumed run continues the same W&B run


class TrackerError(ValueError):
    """An experiment tracker that cannot start (one-line message; a ValueError: the trainers report it so)."""


def start_wandb(out_dir: Path, settings: Mapping[str, Any]):
    """A W&B run writing under ``out_dir/wandb/``; ``settings``: ``project``, ``entity``, ``name``, ``mode``
    (``shared.run_config.WandbConfig``) and ``config`` (the run's resolved config). The run id is kept in
    ``out_dir/wandb-run-id``, so a resume continues the same run."""
    try:
        import wandb
    except ImportError:
        raise TrackerError("tracker=wandb needs the wandb package, which is not installed: pip install wandb, "
                           "or use tracker=none") from None
    import secrets
    import string

    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else \
        "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        run = wandb.init(project=settings["project"], entity=settings.get("entity") or None,
                         name=settings.get("name") or out_dir.resolve().name, mode=settings.get("mode") or None,
                         dir=str(out_dir), id=run_id, resume="allow", config=dict(settings.get("config") or {}))
    except Exception as e:  # no credentials, no network for online mode, a refused project
        msg = str(e).strip().splitlines()
        raise TrackerError(f"cannot start the W&B run: {msg[0] if msg else type(e).__name__} (wandb.mode=offline "
                           f"logs without a server)") from None
    if not id_file.is_file():
        atomic.write_text(id_file, run_id + "\n")
    return run


class RunLogger:
    """Metrics to ``metrics.jsonl`` and TensorBoard, image grids to ``images/``, and with ``wandb`` (the settings
    of ``start_wandb``) the same scalars and images to Weights & Biases; no-op off rank 0."""

    def __init__(self, out_dir: Path, rank: int = 0, tensorboard: bool = True,
                 wandb: Optional[Mapping[str, Any]] = None):
        self.out_dir = Path(out_dir)
        self.active = rank == 0
        self._tb = None
        self._wandb = None
        if self.active:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if wandb is not None:  # first: a tracker that cannot start stops the run before anything is logged
                self._wandb = start_wandb(self.out_dir, wandb)
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: (float(v.item()) if isinstance(v, torch.Tensor) else float(v)) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def images(self, step: int, name: str, images: torch.Tensor, nrow: Optional[int] = None) -> Optional[Path]:
        if not self.active:
            return None
        grid = image_grid(images, nrow=nrow)
        path = self.out_dir / "images" / f"{name}-{step:08d}.png"
        save_png(grid, path)
        if self._tb is not None:
            self._tb.add_image(name, grid, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(grid[..., 0] if grid.shape[-1] == 1 else grid)}, step=step)
        return path

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl file (for tests, reports and resume)."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
