"""Generation metrics of a sample batch against a reference batch: FID, Inception Score, precision, recall.

The paper reports the ADM (guided-diffusion) evaluator's numbers against its ImageNet-256 reference batch.
Here both batches go through the project's one Inception path (``shared.inception``, the same network and
weights file as the Stage-1 rFID) and its metric math (``shared.feature_metrics``).

Everything takes a *feature function* (``shared.inception.FeatureFn``), so the arithmetic is tested with a
tiny stand-in network (no Inception weights exist on CPU test machines).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from shared.feature_metrics import fid_from_features, inception_score, precision_recall
from shared.inception import FeatureFn, extract_features
from stage2_ar.samples_npz import SamplesFileError, read_samples


class MetricsError(RuntimeError):
    """Missing or unusable evaluation inputs (reference batch, images)."""


def compute_metrics(samples: np.ndarray, reference: np.ndarray, feature_fn: FeatureFn, *, batch_size: int = 100,
                    k: int = 3, is_splits: int = 10, device: Optional[torch.device] = None) -> Dict[str, float]:
    """All four metrics of ``samples`` against ``reference`` (both (N, H, W, 3) uint8).

    Precision / recall run their distance GEMMs on ``device`` (default CPU), in blocks of bounded memory.
    """
    try:  # bad layouts, fewer than 2 images
        fs = extract_features(feature_fn, samples, batch_size)
        fr = extract_features(feature_fn, reference, batch_size)
        out = {"fid": fid_from_features(fs["pool"], fr["pool"])}
    except ValueError as e:
        raise MetricsError(str(e)) from None
    out.update(inception_score(fs["logits"], is_splits))
    out.update(precision_recall(fr["pool"], fs["pool"], k, device=device))
    out.update({"num_samples": int(len(samples)), "num_reference": int(len(reference))})
    return out


def load_reference(path: str, size: Optional[int] = None) -> np.ndarray:
    """Reference images as (N, H, W, 3) uint8: an ADM .npz (arr_0) or a folder of images.

    Folder images are centre-cropped to a square and resized to ``size`` (the samples' resolution) so they
    stack; the ADM batches are already square at the evaluation resolution.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        try:
            return read_samples(p, labels=False)[0]
        except SamplesFileError as e:
            raise MetricsError(str(e)) from None
    if p.is_dir():
        from PIL import Image

        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise MetricsError(f"{p} holds no images (.png, .jpg, .jpeg, .webp, .bmp)")
        out = []
        for f in files:
            im = Image.open(f).convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if size and s != size:
                im = im.resize((size, size), Image.BICUBIC)
            out.append(np.asarray(im, dtype=np.uint8))
        if len({a.shape for a in out}) != 1:
            raise MetricsError(f"{p}: images differ in size; pass the sample resolution to resize them")
        return np.stack(out)
    raise MetricsError(f"reference {path} is neither an .npz file nor a directory of images")
