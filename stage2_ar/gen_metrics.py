"""Generation metrics: FID, Inception Score, precision and recall, on InceptionV3 features.

The paper reports the ADM (guided-diffusion) evaluator's numbers against its ImageNet-256 reference batch.
Here the features come from torch-fidelity's TF-compatible InceptionV3 (``inception-v3-compat``, the FID
network ported from TensorFlow) loaded from a local weights file; FID and IS are torch-fidelity's own
formulas. torch-fidelity 0.3 has no precision/recall, so that one is the k-NN manifold estimate of
Kynkäänniemi et al. (2019) with k = 3 on the 2048-d pool features, as the ADM evaluator computes it.

Everything takes a *feature function* ``images (N, 3, H, W) uint8 -> {"pool": (N, D), "logits": (N, C)}``,
so the arithmetic is tested with a tiny stand-in network (no Inception weights exist on CPU test machines).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

FeatureFn = Callable[[torch.Tensor], Dict[str, torch.Tensor]]
INCEPTION_FEATURES = ("2048", "logits_unbiased")  # pool3 features (FID, P/R) and the 1008-way logits (IS)


class MetricsError(RuntimeError):
    """Missing or unusable evaluation inputs (weights, reference batch)."""


# ---------------------------------------------------------------------------------------------- features

def inception_feature_fn(weights: str, device: torch.device = torch.device("cpu")) -> FeatureFn:
    """torch-fidelity's InceptionV3 from a local file (pt_inception-2015-12-05-6726825d.pth); never downloads."""
    path = Path(weights) if weights else None
    if path is None or not path.is_file():
        raise MetricsError(f"InceptionV3 weights not found at {weights!r}: give --inception the local file "
                           "pt_inception-2015-12-05-6726825d.pth (torch-fidelity's FID network; nothing is downloaded)")
    try:  # validate as plain tensors first: never unpickle code
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricsError(f"{path} is not a plain tensor checkpoint: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", list(INCEPTION_FEATURES),
                                          feature_extractor_weights_path=str(path))
    except RuntimeError as e:
        raise MetricsError(f"{path} does not hold torch-fidelity's InceptionV3 weights: {str(e).splitlines()[0]}") from None
    net = net.to(device).eval()

    @torch.no_grad()
    def features(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        pool, logits = net(images.to(device))
        return {"pool": pool.double().cpu(), "logits": logits.double().cpu()}

    return features


def extract(feature_fn: FeatureFn, images: np.ndarray, batch_size: int = 100) -> Dict[str, torch.Tensor]:
    """Run ``feature_fn`` over (N, H, W, 3) uint8 images (ADM layout) in batches."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise MetricsError(f"expected (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    parts: Dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)
        for k, v in feature_fn(x).items():
            parts.setdefault(k, []).append(v.double())
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------- metrics

def gaussian_stats(features: torch.Tensor) -> Dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.double().cpu())


def frechet_distance(stats_1: Dict[str, np.ndarray], stats_2: Dict[str, np.ndarray]) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), via torch-fidelity."""
    import warnings

    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    with warnings.catch_warnings():  # torch-fidelity passes scipy's deprecated sqrtm(disp=...)
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> Dict[str, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` chunks (torch-fidelity, shuffle seed 2020)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits.double().cpu(), splits=min(splits, len(logits)), shuffle=True, rng_seed=2020)
    return {"is": out[KEY_METRIC_ISC_MEAN], "is_std": out[KEY_METRIC_ISC_STD]}


def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64, chunked over rows of ``a``."""
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, len(a), chunk)])


def knn_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point (the manifold ball radius)."""
    d = _pairwise(features, features)
    return d.kthvalue(k + 1, dim=1).values  # index 0 of the sorted row is the point itself (distance 0)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> float:
    inside = [(_pairwise(points[i:i + chunk], centres) <= radii[None]).any(1) for i in range(0, len(points), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> Dict[str, float]:
    """Precision: share of fakes inside the real manifold; recall: share of reals inside the fake one."""
    real, fake = real.double(), fake.double()
    return {"precision": _coverage(fake, real, knn_radii(real, k)),
            "recall": _coverage(real, fake, knn_radii(fake, k))}


def compute_metrics(samples: np.ndarray, reference: np.ndarray, feature_fn: FeatureFn, *, batch_size: int = 100,
                    k: int = 3, is_splits: int = 10) -> Dict[str, float]:
    """All four metrics of ``samples`` against ``reference`` (both (N, H, W, 3) uint8)."""
    fs = extract(feature_fn, samples, batch_size)
    fr = extract(feature_fn, reference, batch_size)
    out = {"fid": frechet_distance(gaussian_stats(fs["pool"]), gaussian_stats(fr["pool"]))}
    out.update(inception_score(fs["logits"], is_splits))
    out.update(precision_recall(fr["pool"], fs["pool"], k))
    out.update({"num_samples": int(len(samples)), "num_reference": int(len(reference))})
    return out


# ---------------------------------------------------------------------------------------------- files

def save_npz(path: Path, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    """ADM sample batch: arr_0 uint8 NHWC (+ arr_1 labels for class-conditional samples), written atomically."""
    from shared.atomic import atomic_path

    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_reference(path: str, size: Optional[int] = None) -> np.ndarray:
    """Reference images as (N, H, W, 3) uint8: an ADM .npz (arr_0) or a folder of images.

    Folder images are centre-cropped to a square and resized to ``size`` (the samples' resolution) so they
    stack; the ADM batches are already square at the evaluation resolution.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as z:
            if "arr_0" not in z:
                raise MetricsError(f"{p} has no arr_0 image array (keys: {', '.join(z.files)})")
            arr = z["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise MetricsError(f"{p}: arr_0 must be (N, H, W, 3) uint8, got {arr.dtype} {arr.shape}")
        return arr
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
