"""Natural-photo crops for the tokenizer ablations: scikit-image's bundled photos, offline and deterministic.

Every photo is halved (2x2 box filter, so a 32 px crop holds more than a patch of smooth surface), then cut
into ``size`` x ``size`` tiles on a regular grid: overlapping (stride size/2) for training, disjoint for the
held-out set. Tiles that are nearly flat (standard deviation of the grey level below ``min_std`` of the full
range: the black backgrounds of the retina and deep-field images) are dropped, since they teach and measure
nothing; photos with many tiles (retina, deep field) are thinned evenly to ``max_per_photo``. Training and
held-out tiles come from different photos (``PhotoData``), never the same scene.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from dataprep.sample_images import photo
from experiments.presets import PhotoData
from shared import atomic


def tiles(arr: np.ndarray, size: int, stride: int, min_std: float) -> List[np.ndarray]:
    """Row-major tiles of an (H, W, 3) uint8 image whose grey-level std is at least ``min_std`` (0-1 range)."""
    out = []
    h, w = arr.shape[:2]
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            t = arr[y:y + size, x:x + size]
            if t.mean(-1).std() / 255.0 >= min_std:
                out.append(t)
    return out


def halved(name: str) -> np.ndarray:
    img = Image.fromarray(photo(name))
    return np.asarray(img.reduce(2))


def evenly(items: List[np.ndarray], cap: int) -> List[np.ndarray]:
    """At most ``cap`` items spread evenly over the list (all of them when cap is 0 or not reached)."""
    if cap <= 0 or len(items) <= cap:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, cap).round().astype(int)]


def write_split(root: Path, names: Sequence[str], size: int, stride: int, min_std: float,
                cap: int) -> Dict[str, int]:
    """``root/<photo>/<photo>-NNNN.png`` for every kept tile; returns tiles per photo."""
    counts = {}
    for name in names:
        kept = evenly(tiles(halved(name), size, stride, min_std), cap)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(kept):
            path = d / f"{name}-{i:04d}.png"
            if not path.exists():
                with atomic.atomic_path(path) as tmp:
                    Image.fromarray(t).save(tmp, format="PNG")
        counts[name] = len(kept)
    return counts


def build(out: Path, cfg: PhotoData) -> Dict[str, Dict[str, int]]:
    """``out/train`` and ``out/heldout`` (one sub-folder per photo); idempotent."""
    overlap = set(cfg.train) & set(cfg.heldout)
    if overlap:
        raise ValueError(f"photos in both splits: {sorted(overlap)}")
    return {
        "train": write_split(out / "train", cfg.train, cfg.size, cfg.train_stride, cfg.min_std, cfg.max_per_photo),
        "heldout": write_split(out / "heldout", cfg.heldout, cfg.size, cfg.size, cfg.min_std,
                               cfg.max_heldout_per_photo),
    }
