"""Real photos offline (scikit-image's bundled images) and image folders cut from them.

Here rather than under tests/ because the encode benchmark (bench/encode_pipeline.py) needs the same
folders as the tests; the test-only fixtures built on these (awkward files, photo patches for the
tokenizer trainer) live in tests/support/fixtures_images.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo(name: str) -> np.ndarray:
    """One bundled photo as (H, W, 3) uint8 RGB (grayscale ones repeated over the channels)."""
    import skimage.data as sd

    arr = sd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(sd, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return arr[..., :3].astype(np.uint8)


def photos(names: Sequence[str] = PHOTOS) -> Dict[str, np.ndarray]:
    return {name: photo(name) for name in names}


def image_folder(root: str | Path, split: str = "train", classes: int = 3, per_class: int = 4,
                 seed: int = 0) -> List[Path]:
    """ROOT/<split>/class_k/*.jpg: random crops (varied sizes and aspect ratios) of the bundled photos."""
    rng = np.random.default_rng(seed)
    pics = list(photos().values())
    out = []
    for c in range(classes):
        d = Path(root) / split / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            a = pics[(c * per_class + j) % len(pics)]
            h, w = a.shape[:2]
            ch, cw = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            p = d / f"img_{c:02d}_{j:03d}.jpg"
            Image.fromarray(a[y:y + ch, x:x + cw]).save(p, quality=92)
            out.append(p)
    return out
