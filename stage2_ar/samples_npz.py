"""The layout of ``samples.npz``, the sample batch written by ``stage2_ar.sample --npz`` and ``stage2_ar.evaluate``.

ADM's layout (openai/guided-diffusion), so its evaluator can score the file as is:

- ``arr_0`` (``IMAGES_KEY``): (N, H, W, 3) uint8 images, converted by ``shared.images.to_uint8``;
- ``arr_1`` (``LABELS_KEY``): (N,) int64 class labels. guided-diffusion's class-conditional sampler writes its
  labels there too (``np.savez(path, images, labels)``); the evaluator and the reference batches use
  ``arr_0`` only, so a batch without labels is valid.

``stage2_ar.evaluate --samples`` reads this file.

Both tools write into an output directory (``OUTPUT_FILES``); ``check_samples_output`` refuses, before any work,
one that holds anything else (someone else's files), unless ``overwrite``.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from shared import atomic
from shared.atomic import atomic_path

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"

PathLike = Union[str, os.PathLike]


# What stage2_ar.sample and stage2_ar.evaluate put in their output directory (parts/: a sharded evaluation's
# per-rank files), and the temporaries an interrupted atomic write of one of them leaves.
GRID_FILE, SAMPLES_FILE, METRICS_FILE, PARTS_DIR = "grid.png", "samples.npz", "metrics.json", "parts"
OUTPUT_FILES = (GRID_FILE, SAMPLES_FILE, METRICS_FILE, PARTS_DIR)
_TEMPORARY = re.compile(r"^\.(?:grid\.png|samples\.npz|metrics\.json)\..+\.tmp$")


class SamplesFileError(ValueError):
    """A sample batch that is not in the layout above (one-line message)."""


def is_output_dir(path: PathLike) -> bool:
    """Whether ``path`` holds nothing but what the sampling tools write (so they may write into it again)."""
    return all(p.name in OUTPUT_FILES or _TEMPORARY.match(p.name) for p in Path(path).iterdir())


def check_samples_output(path: PathLike, overwrite: bool = False) -> Path:
    """Before any work: ``path`` must be a writable directory (or creatable) holding only the sampling tools'
    files; ``overwrite`` allows other files there (they are left alone). One-line ``shared.atomic.OutputError``."""
    what = f"an output directory of stage2_ar.sample / evaluate ({', '.join(OUTPUT_FILES)})"
    return atomic.check_output_dir(path, owned=(lambda p: True) if overwrite else is_output_dir, replaced=False,
                                   what=what)


def _check(images: np.ndarray, labels: Optional[np.ndarray], where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise SamplesFileError(f"{where}: {IMAGES_KEY} must be (N, H, W, 3) uint8, got {images.dtype} {images.shape}")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu"):
        raise SamplesFileError(f"{where}: labels must be {len(images)} integers (one per image), "
                               f"got {labels.dtype} {labels.shape}")


def write_samples(path: PathLike, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    """Write images (and labels) atomically: a reader sees the previous file or the complete new one."""
    images = np.asarray(images)
    labels = None if labels is None else np.asarray(labels)
    _check(images, labels, str(path))
    arrays = {IMAGES_KEY: images}
    if labels is not None:
        arrays[LABELS_KEY] = labels.astype(np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_samples(path: PathLike, labels: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(images, labels or None) of a sample batch; any ADM batch with ``arr_0`` is accepted.

    ``labels=False`` ignores any second array (reference batches: only their images count).
    """
    try:
        z = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # missing, truncated, or not npz / npy at all
        raise SamplesFileError(f"{path} is not a readable .npz file: {type(e).__name__}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise SamplesFileError(f"{path} is a single .npy array, not an .npz sample batch")
    with z:
        if IMAGES_KEY not in z.files:
            raise SamplesFileError(f"{path} has no {IMAGES_KEY} image array (keys: {', '.join(z.files)})")
        images = z[IMAGES_KEY]
        found = z[LABELS_KEY] if labels and LABELS_KEY in z.files else None
    _check(images, found, str(path))
    return images, found
