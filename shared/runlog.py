"""Run logging: JSONL metrics, TensorBoard scalars, PNG image grids, and tqdm bars quiet off rank 0."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from shared import atomic
from shared.images import to_uint8_nhwc


def get_logger(name: str, rank: int = 0) -> logging.Logger:
    """A stderr logger; ranks other than 0 only report warnings and errors."""
    log = logging.getLogger(name)
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return log


def progress(iterable: Optional[Iterable] = None, rank: int = 0, **kwargs):
    """tqdm on rank 0, silent elsewhere."""
    return tqdm(iterable, disable=rank != 0, dynamic_ncols=True, **kwargs)


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


def save_png(array: np.ndarray, path: Path) -> None:
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic.atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


class RunLogger:
    """Metrics to ``metrics.jsonl`` and TensorBoard, image grids to ``images/``; no-op off rank 0."""

    def __init__(self, out_dir: Path, rank: int = 0, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.active = rank == 0
        self._tb = None
        if self.active:
            self.out_dir.mkdir(parents=True, exist_ok=True)
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

    def images(self, step: int, name: str, images: torch.Tensor, nrow: Optional[int] = None) -> Optional[Path]:
        if not self.active:
            return None
        grid = image_grid(images, nrow=nrow)
        path = self.out_dir / "images" / f"{name}-{step:08d}.png"
        save_png(grid, path)
        if self._tb is not None:
            self._tb.add_image(name, grid, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl file (for tests, reports and resume)."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
