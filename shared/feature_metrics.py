"""Metrics on Inception features (``shared.inception``): FID / sFID, Inception Score, precision and recall.

- FID: Frechet distance of the Gaussians (mean, unbiased covariance) fitted to two feature sets, in float64.
  The same quantity as pytorch-fid, torch-fidelity and the ADM evaluator, which take scipy's ``sqrtm`` of
  S1 S2; we get tr (S1 S2)^1/2 from two symmetric eigendecompositions instead (about 10x faster at 2048-d on
  CPU, and no complex round-off on near-singular covariances). Used for the tokenizer's rFID (originals vs
  reconstructions) and the generator's FID (samples vs reference batch). sFID is the same distance on the
  spatial features (``shared.inception``: ``mixed_6/conv``, first 7 channels, 2023-d), as the ADM evaluator
  defines it.
- Inception Score: torch-fidelity's formula on the 1008-way logits (10 splits, shuffle seed 2020).
- Precision / recall: the k-NN manifold estimate of Kynkaanniemi et al. (2019), k = 3 on the 2048-d pool
  features, as the ADM evaluator computes it (torch-fidelity 0.3 has none). Computed in row blocks without
  the N x N distance matrix (about 1 GB instead of 20 GB at 50,000 images), with the result of the exact
  float64 matrix (see the section below).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

Features = Union[np.ndarray, torch.Tensor]


def _float64(features: Features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def gaussian_stats(features: Features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features."""
    f = _float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (S1 S2)^1/2 of two symmetric PSD matrices.

    S1 S2 is similar to S1^1/2 S2 S1^1/2, which is symmetric PSD: the trace is the sum of the square roots of
    its eigenvalues (round-off negatives clipped to 0).
    """
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    lam = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrise the round-off away
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched Gaussians: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))


def fid_from_features(f1: Features, f2: Features) -> float:
    """FID of two (N, D) feature sets."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def inception_score(logits: torch.Tensor, splits: int = 10) -> Dict[str, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` chunks (torch-fidelity, shuffle seed 2020)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    logits = torch.as_tensor(logits).double().cpu()
    out = isc_features_to_metric(logits, splits=min(splits, len(logits)), shuffle=True, rng_seed=2020)
    return {"is": out[KEY_METRIC_ISC_MEAN], "is_std": out[KEY_METRIC_ISC_STD]}


# ------------------------------------------------------------------------------------------ precision / recall
#
# The estimate needs every point's k-th nearest neighbour in its own set and, for every point of the other
# set, whether some ball holds it: an N x N distance matrix, 20 GB of float64 at the protocol's 50,000
# images. It is never held here. Squared distances come in blocks of ``block_bytes`` (rows x N, or square
# tiles of a set against itself; memory O(N * rows)) from the float32 expansion ||a||^2 + ||b||^2 - 2 a.b,
# one GEMM per block on ``device``. Its rounding error has an a-priori bound (``_Points.error_bound``); a
# decision is taken from it only when it holds for every value within the bound, and the few others (ties,
# near-ties) are settled with the pair's float64 sum of squared differences. Every radius is such a float64
# value too, so the result is the one of the exact float64 distance matrix, ties included (a tie is inside,
# as <=).

_U32, _U64 = 2.0 ** -24, 2.0 ** -53  # unit round-offs
_BLOCK_BYTES = 1 << 28  # a float32 block of squared distances, 256 MiB: 1342 rows x 50,000, or an 8192^2 tile
_PAIR_ELEMENTS = 1 << 22  # float64 elements per batch of exact pair distances (32 MiB)


def _gamma(n: int, u: float) -> float:
    """n u / (1 - n u): the relative error bound of an n-term float sum or dot product, in any order."""
    if n * u >= 0.5:
        raise ValueError(f"{n}-d features are too long for a float32 distance bound")
    return n * u / (1 - n * u)


def _float32_below(t: torch.Tensor) -> torch.Tensor:
    """The largest float32 <= each float64 value (a threshold that stays on its side when rounded)."""
    f = t.float()
    return torch.where(f.double() > t, torch.nextafter(f, torch.full_like(f, -float("inf"))), f)


def _float32_above(t: torch.Tensor) -> torch.Tensor:
    f = t.float()
    return torch.where(f.double() < t, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


class _Points:
    """One feature set: float64 rows on the CPU (what every distance is defined on), a float32 copy of the rows
    minus a common ``centre`` with its squared norms on the compute device, and the per-row terms of the
    error bound. Centring is free (distances do not change) and keeps the float32 expansion accurate for
    features far from the origin."""

    def __init__(self, features: Features, device: torch.device, centre: Optional[torch.Tensor] = None):
        self.x64 = torch.as_tensor(_float64(features))
        if self.x64.ndim != 2:
            raise ValueError(f"expected (N, D) features, got shape {tuple(self.x64.shape)}")
        n, d = self.x64.shape
        centre = self.x64.mean(0) if centre is None else centre
        x32 = torch.empty((n, d), dtype=torch.float32)
        self.norm = torch.empty(n, dtype=torch.float64)  # of the centred rows
        self.eps = torch.empty(n, dtype=torch.float64)  # bound on ||float32 row - (row - centre)||
        for i in range(0, n, 4096):  # in slices: no float64 temporary of the whole set
            c = self.x64[i:i + 4096] - centre
            x32[i:i + 4096] = c
            self.norm[i:i + 4096] = torch.linalg.vector_norm(c, dim=1)
            self.eps[i:i + 4096] = torch.linalg.vector_norm(c - x32[i:i + 4096].double(), dim=1)
        self.eps.mul_(1 + 1e-6).add_(self.norm, alpha=2 * _U64)  # + the float64 rounding of the centring
        self.x32 = x32.to(device)
        self.sq32 = torch.linalg.vector_norm(self.x32, dim=1).square_()

    def __len__(self) -> int:
        return len(self.x64)

    def sq_block(self, r0: int, r1: int, other: "_Points", c0: int = 0, c1: Optional[int] = None) -> torch.Tensor:
        """float32 squared distances of rows [r0, r1) to rows [c0, c1) of ``other`` (default: all of them)."""
        cols = slice(c0, c1)
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # a TF32 / bf16 GEMM would exceed the error bound
        try:
            s = torch.addmm(other.sq32[None, cols], self.x32[r0:r1], other.x32[cols].T, alpha=-2.0)
        finally:
            torch.set_float32_matmul_precision(prev)
        s += self.sq32[r0:r1, None]
        return s.clamp_min_(0)  # a true squared distance is >= 0: clamping only removes error

    def error_bound(self, r0: int, r1: int, other: "_Points") -> float:
        """A bound on |sq_block - float64 squared difference| over the block.

        With a, b centred and rho >= ||a32|| + ||b32||: the expansion is within gamma_{D+3} rho^2 of
        ||a32 - b32||^2 (norms, dot product, the sums; doubled for safety); ||a32 - b32|| is within
        eps = eps_a + eps_b of ||a - b||, which moves its square by at most eps (2 rho + eps); the float64 sum
        of squared differences is within gamma_{D+2} ||a - b||^2 <= gamma_{D+2} rho^2 of the true value. The
        factor 1 + 1e-6 covers the float64 arithmetic of the norms and of this bound.
        """
        d = self.x64.shape[1]
        eps = float(self.eps[r0:r1].max()) + float(other.eps.max())
        rho = float(self.norm[r0:r1].max()) + float(other.norm.max()) + eps
        bound = (2 * _gamma(d + 3, _U32) + _gamma(d + 2, _U64)) * rho ** 2 + eps * (2 * rho + eps)
        return bound * (1 + 1e-6)


def _exact_sq(a: torch.Tensor, ia: torch.Tensor, b: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """float64 ||a[ia] - b[ib]||^2 pair by pair, on the CPU: the values every decision is defined by.

    Each pair is one contiguous row reduced on its own, so it gets the same bits in any batch and in either
    order (a - b and b - a square to the same numbers), which is what makes duplicated points tie exactly.
    """
    out = torch.empty(len(ia), dtype=torch.float64)
    step = max(2, _PAIR_ELEMENTS // max(1, a.shape[1]))
    for s in range(0, len(ia), step):
        i, j = ia[s:s + step], ib[s:s + step]
        one = len(i) == 1
        if one:  # torch may split a lone long row's sum across threads: keep the per-row order of the others
            i, j = i.repeat(2), j.repeat(2)
        d = a[i] - b[j]
        out[s:s + step] = d.mul_(d).sum(1)[:1 if one else None]
    return out


def _block_rows(n_cols: int, block_bytes: int) -> int:
    return max(1, block_bytes // (4 * max(1, n_cols)))


def _tiles(n: int, block_bytes: int) -> int:
    """How many square tiles ``_sq_radii`` visits for n points (its progress total)."""
    t = -(-n // max(1, min(n, math.isqrt(block_bytes // 4))))
    return t * (t + 1) // 2


def _sq_radii(x: _Points, k: int, block_bytes: int, tick: Callable[[], None] = lambda: None) -> torch.Tensor:
    """float64 squared distance of each point to its k-th nearest other point (CPU, (N,)).

    The symmetric N x N float32 matrix is visited in square tiles of its upper triangle, each read by rows
    and by columns (half the GEMMs of row blocks). Every point keeps the k + 1 smallest values seen so far,
    whose largest, t, only falls towards the row's final (k+1)-th smallest v, and every pair within
    t + 2 delta: a superset of the pairs within v + 2 delta. With every |float32 - exact| <= delta, those hold
    all pairs whose exact value is at most the exact (k+1)-th smallest (the point itself is the first), so
    that is the (k+1)-th smallest exact value among them.
    """
    n = len(x)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per set, got {n}")
    dev = x.x32.device
    side = max(1, min(n, math.isqrt(block_bytes // 4)))
    delta = x.error_bound(0, n, x)
    best = torch.full((n, k + 1), float("inf"), device=dev)
    kept: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # candidate (row, column, float32 value)

    def take(r0: int, c0: int, s: torch.Tensor) -> None:  # s: rows r0.. against columns c0..
        r = slice(r0, r0 + s.shape[0])
        low = s.topk(min(k + 1, s.shape[1]), dim=1, largest=False).values
        best[r] = torch.cat([best[r], low], 1).topk(k + 1, dim=1, largest=False).values
        i, j = (s <= _float32_above(best[r, -1].double() + 2 * delta)[:, None]).nonzero().unbind(1)
        kept.append((i + r0, j + c0, s[i, j]))

    for r0 in range(0, n, side):
        for c0 in range(r0, n, side):
            s = x.sq_block(r0, min(n, r0 + side), x, c0, min(n, c0 + side))
            if c0 == r0:
                s.diagonal().zero_()  # a point's distance to itself is exactly 0 (the expansion leaves round-off)
            take(r0, c0, s)
            if c0 != r0:
                take(c0, r0, s.T)
            tick()
    row, col, val = (torch.cat(part) for part in zip(*kept))
    final = val <= _float32_above(best[:, -1].double() + 2 * delta)[row]
    row, col = row[final].cpu(), col[final].cpu()
    e = _exact_sq(x.x64, row, x.x64, col)
    order = torch.argsort(e, stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # by row, ascending values within a row
    counts = torch.bincount(row, minlength=n)
    return e[order][torch.cumsum(counts, 0) - counts + k]


def knn_radii(features: Features, k: int = 3, device: Optional[Union[str, torch.device]] = None,
              block_bytes: int = _BLOCK_BYTES) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point (the manifold ball radius), float64 (N,)."""
    return _sq_radii(_Points(features, torch.device(device or "cpu")), k, block_bytes).sqrt()


def _coverages(fake: _Points, real: _Points, sq_r_fake: torch.Tensor, sq_r_real: torch.Tensor,
               block_bytes: int, tick: Callable[[], None] = lambda: None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(each fake point in some real ball, each real point in some fake ball) from one pass over fake x real."""
    dev = real.x32.device
    r_real, r_fake = sq_r_real.to(dev), sq_r_fake.to(dev)
    in_real = torch.zeros(len(fake), dtype=torch.bool, device=dev)
    in_fake = torch.zeros(len(real), dtype=torch.bool, device=dev)
    rows = _block_rows(len(real), block_bytes)
    for r0 in range(0, len(fake), rows):
        r1 = min(len(fake), r0 + rows)
        s = fake.sq_block(r0, r1, real)
        delta = fake.error_bound(r0, r1, real)
        # precision: fake p is inside real ball c iff exact(p, c) <= R_c
        sure = (s <= _float32_below(r_real - delta)).any(1)
        maybe = s <= _float32_above(r_real + delta)
        maybe &= ~sure[:, None]
        p, c = maybe.nonzero().cpu().unbind(1)
        hit = _exact_sq(fake.x64, p + r0, real.x64, c) <= sq_r_real[c]
        sure[p[hit].to(dev)] = True
        in_real[r0:r1] = sure
        # recall: real c is inside fake ball p iff exact(p, c) <= R_p (the same block, read by columns)
        in_fake |= (s <= _float32_below(r_fake[r0:r1] - delta)[:, None]).any(0)
        maybe = s <= _float32_above(r_fake[r0:r1] + delta)[:, None]
        maybe &= ~in_fake[None, :]
        p, c = maybe.nonzero().cpu().unbind(1)
        hit = _exact_sq(fake.x64, p + r0, real.x64, c) <= sq_r_fake[p + r0]
        in_fake[c[hit].to(dev)] = True
        tick()
    return in_real, in_fake


def precision_recall(real: Features, fake: Features, k: int = 3, *,
                     device: Optional[Union[str, torch.device]] = None,
                     block_bytes: int = _BLOCK_BYTES, show_progress: bool = False) -> Dict[str, float]:
    """Precision: share of fakes inside the real manifold; recall: share of reals inside the fake one.

    The GEMMs run on ``device`` (default CPU); memory beyond the inputs is a float32 copy of both sets plus
    a few ``block_bytes`` blocks (0.98 GiB measured for 50,000 x 2,048 features on the CPU). With
    ``show_progress``, progress in distance blocks with an ETA (``shared.progress``).
    """
    from shared.progress import progress

    dev = torch.device(device or "cpu")
    real, fake = torch.as_tensor(_float64(real)), torch.as_tensor(_float64(fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, D) of one width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    r = _Points(real, dev)
    f = _Points(fake, dev, centre=r.x64.mean(0))  # one centre: cross distances are between the two copies
    total = _tiles(len(f), block_bytes) + _tiles(len(r), block_bytes) + -(-len(f) // _block_rows(len(r), block_bytes))
    bar = progress(desc="precision / recall", total=total, unit="block", disable=not show_progress)
    radii = _sq_radii(f, k, block_bytes, bar.update), _sq_radii(r, k, block_bytes, bar.update)
    in_real, in_fake = _coverages(f, r, *radii, block_bytes, bar.update)
    bar.close()
    return {"precision": float(in_real.double().mean()), "recall": float(in_fake.double().mean())}
