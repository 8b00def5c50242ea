"""Generation metrics of a sample batch against a reference batch: FID, sFID, Inception Score, precision, recall.

The paper reports the ADM (guided-diffusion) evaluator's numbers against its ImageNet-256 reference batch.
Here both batches go through the project's one Inception path (``shared.inception``, the same network and
weights file as the Stage-1 rFID) and its metric math (``shared.feature_metrics``).

Everything takes a *feature function* (``shared.inception.FeatureFn``), so the arithmetic is tested with a
tiny stand-in network (no Inception weights exist on CPU test machines).

sFID is the Frechet distance of the spatial features (``shared.inception``: the ADM evaluator's
``mixed_6/conv``, first 7 channels, 2023-d) instead of pool3's; it is reported when the feature function
gives ``"spatial"`` features (the real network always does). By default the reference side of FID and sFID is
fitted to the reference images through the same network as the samples; with ``reference_stats`` (the ADM
.npz's precomputed ``mu`` / ``sigma`` and ``mu_s`` / ``sigma_s``, computed by the evaluator's TensorFlow graph)
those are used instead. Precision / recall always need the reference images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from shared.feature_metrics import frechet_distance, gaussian_stats, inception_score, precision_recall
from shared.inception import FeatureFn, extract_features
from stage2_ar.samples_npz import SamplesFileError, read_samples


# The paper's reference batch: ImageNet 256 x 256 of OpenAI's guided-diffusion (ADM) evaluation suite.
ADM_REFERENCE_FILE = "VIRTUAL_imagenet256_labeled.npz"
ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     + ADM_REFERENCE_FILE)


class MetricsError(RuntimeError):
    """Missing or unusable evaluation inputs (reference batch, images)."""


def missing_reference(path) -> str:
    """One line for a reference batch that is not there: what it is and where the paper's one comes from."""
    return (f"reference batch {path} does not exist: give an ADM .npz (arr_0 uint8 images) or a folder of images; "
            f"the paper's is {ADM_REFERENCE_FILE} from the ADM (guided-diffusion) evaluation suite, "
            f"{ADM_REFERENCE_URL} (docs/evaluation-assets.md)")


# an ADM reference batch's precomputed statistics: metric -> (mean key, covariance key, feature name)
REFERENCE_STATS = {"fid": ("mu", "sigma", "pool"), "sfid": ("mu_s", "sigma_s", "spatial")}


def load_reference_stats(path) -> Dict[str, np.ndarray]:
    """``mu`` / ``sigma`` (pool3) and ``mu_s`` / ``sigma_s`` (spatial) of an ADM reference .npz, float64."""
    p = Path(path)
    keys = [k for mean, cov, _ in REFERENCE_STATS.values() for k in (mean, cov)]
    try:
        with np.load(p) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise MetricsError(f"{p} has no precomputed statistics {', '.join(missing)} (an ADM reference batch "
                                   f"carries mu, sigma, mu_s, sigma_s); drop --ref-stats npz to fit them to its images")
            stats = {k: np.asarray(z[k], dtype=np.float64) for k in keys}
    except (OSError, ValueError) as e:
        raise MetricsError(f"cannot read statistics from {p}: {e}") from None
    for mean, cov, _ in REFERENCE_STATS.values():
        d = stats[mean].shape
        if len(d) != 1 or stats[cov].shape != d * 2:
            raise MetricsError(f"{p}: {mean} {d} and {cov} {stats[cov].shape} are not a mean and its covariance")
    return stats


def compute_metrics(samples: np.ndarray, reference: np.ndarray, feature_fn: FeatureFn, *, batch_size: int = 100,
                    k: int = 3, is_splits: int = 10, device: Optional[torch.device] = None,
                    reference_stats: Optional[Dict[str, np.ndarray]] = None,
                    show_progress: bool = False) -> Dict[str, float]:
    """FID, sFID (with spatial features), IS, precision and recall of ``samples`` against ``reference`` (both
    (N, H, W, 3) uint8); ``reference_stats``: ``load_reference_stats``' arrays for the reference side of FID /
    sFID instead of the reference images' features.

    Precision / recall run their distance GEMMs on ``device`` (default CPU), in blocks of bounded memory.
    ``show_progress``: progress with an ETA on featurisation and precision / recall (``shared.progress``).
    """
    out: Dict[str, float] = {}
    try:  # bad layouts, fewer than 2 images, feature widths that do not match the statistics
        fs, fr = (extract_features(feature_fn, images, batch_size, desc=f"features of the {what}" if show_progress
                                   else None) for images, what in ((samples, "samples"), (reference, "reference")))
        for metric, (mean, cov, name) in REFERENCE_STATS.items():
            if name not in fs:
                continue
            ref = (reference_stats[mean], reference_stats[cov]) if reference_stats else gaussian_stats(fr[name])
            out[metric] = frechet_distance(*gaussian_stats(fs[name]), *ref)
    except ValueError as e:
        raise MetricsError(str(e)) from None
    out.update(inception_score(fs["logits"], is_splits))
    out.update(precision_recall(fr["pool"], fs["pool"], k, device=device, show_progress=show_progress))
    out.update({"num_samples": int(len(samples)), "num_reference": int(len(reference))})
    return out


_TABLE = (("fid", "FID", "pool3, 2048-d"), ("sfid", "sFID", "mixed_6/conv[:7], 2023-d"),
          ("is", "IS", "1008-way logits, 10 splits"), ("precision", "precision", "k-NN manifold, pool3"),
          ("recall", "recall", "k-NN manifold, pool3"))


def format_table(metrics: Dict[str, float]) -> str:
    """The metrics as an aligned three-column table (metric, value, what it is computed on)."""
    rows = [("metric", "value", "features")]
    for key, name, what in _TABLE:
        if key in metrics:
            value = f"{metrics[key]:.4f}"
            if key == "is" and "is_std" in metrics:
                value += f" +- {metrics['is_std']:.4f}"
            rows.append((name, value, what))
    rows += [(name, str(metrics.get(f"num_{name}", "")), "") for name in ("samples", "reference")]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows)


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
