"""Class-conditional sampling: token grids with KV caches, per-sub-token CFG / temperature, top-k / top-p; and
``generate_images``, the one loop from labels and seeds to decoded images that every caller uses (the sample
and evaluate CLIs, the trainer's previews, the ablation grids).

Per raster position t: one inter step (cached keys/values of positions < t), then M intra steps (a small
cache of M slots, overwritten at every position): slot 0 is the inter output, slot m >= 1 the embedding of
the sub-token just sampled. Classifier-free guidance doubles the batch with the null class and mixes the
logits as u + s_m * (c - u) with a separate constant scale s_m per sub-token, as the official sampler does:
only where s_m > 1; a sub-token with s_m <= 1 takes the plain conditional logits (no guidance), and a run
where no scale exceeds 1 runs no doubled batch at all. The sampled sub-token is fed to both halves.
Temperature divides the guided logits, then top-k / top-p (the official filters: ``filter_logits``), then
a draw; temperature, top-k and top-p take one value or one per sub-token. How the model is stepped (prefix
recompute, KV caches, fixed-shape compiled steps) is ``stage2_ar.kv_steppers``.

Scales the official sampler cannot run: it sizes its KV caches for the doubled batch when the first scale
is >= 1 but doubles the batch only when it is > 1, so a scale of exactly 1.0 crashes it with a shape
mismatch, and so does a run that guides one sub-token and not another. Here a run guides exactly the
sub-tokens whose scale is > 1, and the one ambiguous case is refused (``check_sampling``, one line): a
scale of exactly 1.0 next to a guided sub-token, where the guidance caches are in use and 1.0 could mean
either "guided at 1" or "unguided". Without any guided sub-token 1.0 means no guidance (the default).

Draws use inverse-CDF sampling from uniforms of the caller's generator (on its own device), so a seed gives
the same tokens whichever device the model runs on, up to floating-point differences of the logits.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from shared.device import autocast
from shared.images import to_uint8_nhwc
from stage2_ar import kv_steppers
from stage2_ar.model import FactorizedAR

Number = Union[int, float]
Bounds = List[Tuple[int, int]]


def per_subtoken(value, m: int, name: str, default) -> Tuple:
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
        value = default
    if isinstance(value, (int, float)):
        return (value,) * m
    value = tuple(value)
    if len(value) == 1:
        return value * m
    if len(value) != m:
        raise ValueError(f"{name} needs 1 or {m} values (one per sub-token), got {value}")
    return value


def _values(v) -> Tuple:
    return () if v is None else tuple(v) if isinstance(v, (tuple, list)) else (v,)


def guided(scale) -> bool:
    """Whether a sub-token with this CFG scale is guided: the official rule, scale > 1 (<= 1: no guidance)."""
    return float(scale) > 1.0


def check_sampling(cfg_scales=None, temperatures=None, top_k=0, top_p=1.0) -> None:
    """Refuse settings that would sample silently wrong (one value or one per sub-token each; None = default):
    top_p outside (0, 1] (0 masks every token: all-zero grids), a negative temperature (samples the inverted
    distribution), a negative or fractional top_k, a non-finite CFG scale or temperature, and a CFG scale of
    exactly 1.0 next to a guided one (> 1), where the official sampler crashes (module docstring).
    One-line ValueError."""
    for s in _values(cfg_scales):
        if not math.isfinite(float(s)):
            raise ValueError(f"CFG scale must be a finite number, got {s}")
    scales = [float(s) for s in _values(cfg_scales)]
    if 1.0 in scales and any(guided(s) for s in scales):
        raise ValueError(f"cfg_scales {tuple(scales)}: a scale of exactly 1.0 next to a guided sub-token (scale > 1) "
                         f"is ambiguous and crashes the official sampler; give a scale > 1 to guide that sub-token "
                         f"or one < 1 for its plain conditional logits")
    for t in _values(temperatures):
        if not (math.isfinite(float(t)) and float(t) >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = argmax) and finite, got {t}")
    for k in _values(top_k):
        if isinstance(k, bool) or not math.isfinite(float(k)) or int(k) != k or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k}")
    for q in _values(top_p):
        if not 0 < float(q) <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {q}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus of mass top_p to -inf (at least one survives).

    The official filter (``top_k_top_p_filtering``): top-k drops every logit below the k-th largest (ties
    stay); top-p sorts descending, takes the cumulative softmax mass and drops a token when the mass up to
    and including the token before it exceeds top_p. So the token that crosses top_p is kept, and so is one
    whose preceding mass equals top_p exactly."""
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        over = sorted_logits.softmax(-1).cumsum(-1) > top_p
        # shifted right by one: token j goes when the cumulative mass of tokens 0..j-1 is over top_p
        drop_sorted = torch.cat([torch.zeros_like(over[..., :1]), over[..., :-1]], dim=-1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def uniforms(n: int, steps: int, generator, device) -> torch.Tensor:
    """(steps, n) uniforms in (0, 1], drawn up front in one call per generator and copied to ``device`` once.

    ``generator``: None (global RNG), one torch.Generator on any device, or a list of n generators, one per
    row: row i then holds the first ``steps`` uniforms of generator i, whichever rows share its batch. On
    CPU generators this is the same stream as one draw per step (the generator is consumed in order).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} rows")
        u = torch.stack([torch.rand(steps, generator=g, device=g.device).to(device) for g in generator], 1)
    else:
        gdev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(steps, n, generator=generator, device=gdev).to(device)
    return 1.0 - u


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None,
         u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One sample per row of (N, V) logits; temperature 0 means argmax.

    ``u``: this draw's (N,) uniforms in (0, 1] (see ``uniforms``); else drawn here from ``generator``.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    if u is None:
        u = uniforms(logits.shape[0], 1, generator, logits.device)[0]
    u = u.reshape(-1, 1) * cdf[:, -1:]
    # first index whose cdf reaches u: it always has non-zero probability since u > 0
    return (cdf < u).sum(-1).clamp_(max=logits.shape[-1] - 1)


class Sampler:
    """Samples token grids from ``model`` with one way of stepping it (``stage2_ar.kv_steppers``).

    ``use_cache=False`` recomputes the whole prefix at every step (the benchmark's baseline). ``static=True``
    runs fixed-shape steps (``kv_steppers.Static``), which ``compile`` (a ``torch.compile`` mode;
    "reduce-overhead" captures CUDA graphs) compiles. A static sampler keeps the steppers it builds, one per
    batch size and cache dtype, so its later calls with the same shapes replay the same graphs: keep one
    ``Sampler`` for repeated calls.
    """

    def __init__(self, model: FactorizedAR, *, use_cache: bool = True, static: bool = False,
                 compile: Optional[str] = None):
        if compile is not None and not static:
            raise ValueError("compile needs static=True (fixed-shape decode steps)")
        if static and not use_cache:
            raise ValueError("static=True is a KV-cache decoder; it cannot be combined with use_cache=False")
        self.model, self.use_cache, self.static, self.compile = model, use_cache, static, compile
        self._static_steppers: Dict[Tuple[int, torch.dtype], kv_steppers.Static] = {}

    def _stepper(self, batch: int):
        model = self.model
        if not self.static:
            return kv_steppers.Cached(model) if self.use_cache else kv_steppers.Recompute(model)
        key = (batch, kv_steppers.cache_dtype(model, model.class_emb.weight.device))
        if key not in self._static_steppers:  # built (and compiled) once: later calls reuse the graphs
            self._static_steppers[key] = kv_steppers.Static(model, batch, self.compile)
        return self._static_steppers[key]

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, *, cfg_scales: Union[None, Number, Sequence[Number]] = None,
                 temperatures: Union[None, Number, Sequence[Number]] = None,
                 top_k: Union[int, Sequence[int]] = 0, top_p: Union[float, Sequence[float]] = 1.0,
                 generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                 guidance: Optional[bool] = None, return_logits: bool = False):
        """Token grids for ``labels`` (B,); the settings as in ``generate``."""
        model = self.model
        cfg = model.cfg
        m = len(cfg.bits)
        scales = per_subtoken(cfg_scales, m, "cfg_scales", cfg.cfg_scales or 1.0)
        temps = per_subtoken(temperatures, m, "temperatures", cfg.temperatures or 1.0)
        ks = per_subtoken(top_k, m, "top_k", 0)
        ps = per_subtoken(top_p, m, "top_p", 1.0)
        check_sampling(scales, temps, ks, ps)
        doubled = any(guided(s) for s in scales) if guidance is None else bool(guidance)
        was_training = model.training
        model.eval()
        try:
            return self._generate(labels, scales, temps, ks, ps, doubled, generator, return_logits)
        finally:
            model.train(was_training)

    def _generate(self, labels, scales, temps, ks, ps, doubled, generator, return_logits):
        model = self.model
        cfg = model.cfg
        M, T = len(cfg.bits), cfg.num_tokens
        device = model.class_emb.weight.device
        labels = labels.to(device=device, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() > model.null_class):
            raise ValueError(f"labels must lie in [0, {model.null_class}] ({model.null_class} = null class)")
        b = labels.shape[0]
        lab = torch.cat([labels, torch.full_like(labels, model.null_class)]) if doubled else labels

        def both(x):  # feed the same sampled sub-token to the conditional and unconditional halves
            return torch.cat([x, x]) if doubled else x

        # every uniform of the run at once: no per-draw host-to-device copy (temperature 0 draws none)
        random_m = [m for m in range(M) if float(temps[m]) != 0]
        u_all = uniforms(b, T * len(random_m), generator, device)
        out = [torch.zeros(b, T, dtype=torch.long, device=device) for _ in range(M)]
        kept = [[] for _ in range(M)] if return_logits else None
        step = self._stepper(lab.shape[0])
        x = model.class_emb(lab)[:, None]  # inter input of position 0
        for t in range(T):
            h = step.inter(x, t)
            y, picked = h, []
            head_in = model.norm(h)[:, -1] if model.independent_heads else None
            for m in range(M):
                # n_intra = 0: every head reads the inter output
                o = head_in if head_in is not None else step.intra(y, m)
                logits = model.heads[m](o).float()
                cond, uncond = logits.chunk(2) if doubled else (logits, None)
                # the official rule: guided only where the scale is > 1, else the plain conditional logits
                mixed = uncond + float(scales[m]) * (cond - uncond) if doubled and guided(scales[m]) else cond
                if kept is not None:
                    kept[m].append(cond)
                u = u_all[t * len(random_m) + random_m.index(m)] if m in random_m else None
                sub = draw(mixed, float(temps[m]), int(ks[m]), float(ps[m]), u=u)
                out[m][:, t] = sub
                picked.append(both(sub))
                if m < M - 1:
                    y = model.tok_emb[m](picked[-1])[:, None]
            x = model.embed([p[:, None] for p in picked])
        indices = model.join(out).view(b, *cfg.grid)
        if return_logits:
            return indices, tuple(torch.stack(k, 1) for k in kept)
        return indices


def generate(
    model: FactorizedAR,
    labels: torch.Tensor,
    *,
    cfg_scales: Union[None, Number, Sequence[Number]] = None,
    temperatures: Union[None, Number, Sequence[Number]] = None,
    top_k: Union[int, Sequence[int]] = 0,
    top_p: Union[float, Sequence[float]] = 1.0,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
    use_cache: bool = True,
    guidance: Optional[bool] = None,
    return_logits: bool = False,
    static: bool = False,
    compile: Optional[str] = None,
):
    """Sample token grids for ``labels`` (B,): returns (B, h, w) int64 18-bit indices on the model's device.

    cfg_scales / temperatures / top_k / top_p: one value or one per sub-token; None (scales, temperatures)
    takes the model config's defaults (the paper's per-preset settings), else 1.0. A sub-token is guided
    where its scale is > 1 (<= 1: its plain conditional logits, as the official sampler); a scale of exactly
    1.0 next to a guided one is refused (ValueError, see the module docstring). guidance: None = run the
    doubled batch when some scale is > 1, True = always run it (sub-tokens with scale <= 1 still take its
    conditional half), False = never (no guidance whatever the scales). generator: one torch.Generator (any
    device) or a list of B generators, one per image (a seed per image: results independent of batching). use_cache, static,
    compile: how the model is stepped (see ``Sampler``; this one-off call builds its own, so keep a
    ``Sampler`` to reuse compiled static steps). return_logits=True also returns the conditional logits that
    produced each sub-token (M tensors (B, h*w, V_m), fp32), to check them against a teacher-forced forward.
    """
    return Sampler(model, use_cache=use_cache, static=static, compile=compile).generate(
        labels, cfg_scales=cfg_scales, temperatures=temperatures, top_k=top_k, top_p=top_p, generator=generator,
        guidance=guidance, return_logits=return_logits)


# ---------------------------------------------------------------------------------------------- images


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` of a run with ``seed`` (distinct for distinct pairs while index < 1e6)."""
    return seed * 1_000_003 + index


def rank_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Bounds:
    """(start, stop) of the batches ``rank`` generates: single-process batch b goes to rank b % world_size."""
    return [(s, min(s + batch_size, n)) for b, s in enumerate(range(0, n, batch_size)) if b % world_size == rank]


class Generated(NamedTuple):
    """What ``generate_images`` made: ``indices`` (K,) int64, the positions in ``labels`` of its images, in
    order; ``images``: (K, H, W, 3) uint8 numpy (``uint8=True``) or (K, 3, H, W) float32 CPU tensor clamped to
    [-1, 1], None without a decoder; ``tokens``: (K, h, w) int64 CPU tensor with ``return_tokens``, else None."""

    indices: np.ndarray
    images: Union[None, np.ndarray, torch.Tensor]
    tokens: Optional[torch.Tensor]


@torch.no_grad()
def generate_images(
    model: FactorizedAR,
    decoder,
    labels: Union[Sequence[int], np.ndarray, torch.Tensor],
    *,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    precision: str = "fp32",
    decode_precision: str = "fp32",
    uint8: bool = False,
    return_tokens: bool = False,
    progress: Optional[Callable[[Bounds], Iterable[Tuple[int, int]]]] = None,
    cfg_scales: Union[None, Number, Sequence[Number]] = None,
    temperatures: Union[None, Number, Sequence[Number]] = None,
    top_k: Union[int, Sequence[int]] = 0,
    top_p: Union[float, Sequence[float]] = 1.0,
) -> Generated:
    """Images for ``labels``, in batches of ``batch_size`` (None: one batch), decoded by ``decoder`` (a Stage-1
    tokenizer; None: tokens only).

    Seeds: ``seed`` gives image i (its position in ``labels``) its own CPU generator seeded with
    ``image_seed(seed, i)``, so an image does not depend on the batching or the number of processes;
    ``generator`` instead draws every image from that one generator (consumed batch after batch); neither:
    torch's global RNG. ``rank`` of ``world_size`` generates only its share (``rank_batches``), with the
    single-process batch boundaries. ``precision``: autocast of the AR model; ``decode_precision``: the
    decoder's. ``uint8=True`` converts each batch to uint8 NHWC right away (``shared.images.to_uint8``: 50k
    images at 256 px stay under 10 GB). ``progress`` wraps the list of this rank's (start, stop) batches (a
    progress bar or a logger). CFG, temperature, top-k / top-p: as in ``generate``.
    """
    if seed is not None and generator is not None:
        raise ValueError("give seed (one generator per image) or generator (one for all), not both")
    if decoder is None and not return_tokens:
        raise ValueError("nothing to return: no decoder and return_tokens=False")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = len(labels)
    bounds = rank_batches(n, batch_size or max(n, 1), rank, world_size)
    device = model.class_emb.weight.device
    sampler = Sampler(model)
    images, tokens = [], []
    for s, e in (progress(bounds) if progress is not None else bounds):
        gen = generator if seed is None else [torch.Generator().manual_seed(image_seed(seed, i)) for i in range(s, e)]
        with autocast(device, precision):
            idx = sampler.generate(labels[s:e], cfg_scales=cfg_scales, temperatures=temperatures, top_k=top_k,
                                   top_p=top_p, generator=gen)
        if return_tokens:
            tokens.append(idx.cpu())
        if decoder is not None:
            decoded = decoder.decode(idx, precision=decode_precision)
            images.append(to_uint8_nhwc(decoded) if uint8 else decoded.clamp(-1, 1).cpu())
    indices = np.asarray([i for s, e in bounds for i in range(s, e)], dtype=np.int64)
    if decoder is None:
        out_images = None
    elif uint8:
        out_images = np.concatenate(images) if images else np.zeros((0, 0, 0, 3), dtype=np.uint8)
    else:
        out_images = torch.cat(images) if images else torch.zeros(0, 3, 0, 0)
    grids = None
    if return_tokens:
        grids = torch.cat(tokens) if tokens else torch.zeros(0, *model.cfg.grid, dtype=torch.long)
    return Generated(indices, out_images, grids)
