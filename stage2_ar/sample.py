"""Class-conditional sampling with KV caches, per-sub-token CFG / temperature, top-k / top-p; and its CLI.

    python -m stage2_ar.sample --ckpt AR_DIR --tokenizer TOK_DIR --classes 0,1,2 --per-class 4 --out DIR \
        [--npz] [--seed 0] [--cfg 1.9,2.0] [--temperature 1.0,1.0] [--top-k 0] [--top-p 1.0]

Per raster position t: one inter step (cached keys/values of positions < t), then M intra steps (a small
cache of M slots, overwritten at every position): slot 0 is the inter output, slot m >= 1 the embedding of
the sub-token just sampled. Classifier-free guidance doubles the batch with the null class and mixes the
logits as u + s_m * (c - u) with a separate constant scale s_m per sub-token; the sampled sub-token is fed to
both halves. Temperature divides the guided logits, then top-k / top-p, then a draw.

Draws use inverse-CDF sampling from uniforms of the caller's generator (on its own device), so a seed gives
the same tokens whichever device the model runs on, up to floating-point differences of the logits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from stage2_ar.model import FactorizedAR

Number = Union[int, float]


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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus of mass top_p to -inf (at least one survives)."""
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep a token if the mass strictly before it is below top_p (so the most likely one always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _uniforms(n: int, generator, device) -> torch.Tensor:
    """(n, 1) uniforms in (0, 1]: from one generator, or one draw per row from a list of n generators."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} rows")
        u = torch.cat([torch.rand(1, 1, generator=g, device=g.device).to(device) for g in generator])
    else:
        gdev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(n, 1, generator=generator, device=gdev).to(device)
    return 1.0 - u


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """One sample per row of (N, V) logits; temperature 0 means argmax.

    ``generator``: None (global RNG), a torch.Generator on any device, or one generator per row (then each
    row's draws do not depend on which other rows share its batch).
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    u = _uniforms(logits.shape[0], generator, logits.device) * cdf[:, -1:]
    # first index whose cdf reaches u: it always has non-zero probability since u > 0
    return (cdf < u).sum(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
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
):
    """Sample token grids for ``labels`` (B,): returns (B, h, w) int64 18-bit indices on the model's device.

    cfg_scales / temperatures: one value or one per sub-token; None takes the model config's defaults
    (the paper's per-preset settings), else 1.0. guidance: None = use CFG when any scale differs from 1,
    True = always run the doubled batch, False = never. generator: one torch.Generator (any device) or a list
    of B generators, one per image (a seed per image: results independent of batching). use_cache=False
    recomputes the whole prefix at every step (the benchmark's baseline). return_logits=True also returns
    the conditional logits that produced each sub-token (M tensors (B, h*w, V_m), fp32), to check them
    against a teacher-forced forward.
    """
    cfg = model.cfg
    M, T = len(cfg.bits), cfg.num_tokens
    scales = per_subtoken(cfg_scales, M, "cfg_scales", cfg.cfg_scales or 1.0)
    temps = per_subtoken(temperatures, M, "temperatures", cfg.temperatures or 1.0)
    ks = per_subtoken(top_k, M, "top_k", 0)
    ps = per_subtoken(top_p, M, "top_p", 1.0)
    guided = any(float(s) != 1.0 for s in scales) if guidance is None else bool(guidance)

    was_training = model.training
    model.eval()
    try:
        return _generate(model, labels, scales, temps, ks, ps, guided, generator, use_cache, return_logits)
    finally:
        model.train(was_training)


def _generate(model, labels, scales, temps, ks, ps, guided, generator, use_cache, return_logits):
    cfg = model.cfg
    M, T = len(cfg.bits), cfg.num_tokens
    device = model.class_emb.weight.device
    labels = labels.to(device=device, dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > model.null_class):
        raise ValueError(f"labels must lie in [0, {model.null_class}] ({model.null_class} = null class)")
    b = labels.shape[0]
    lab = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels

    def both(x):  # feed the same sampled sub-token to the conditional and unconditional halves
        return torch.cat([x, x]) if guided else x

    out = [torch.zeros(b, T, dtype=torch.long, device=device) for _ in range(M)]
    kept = [[] for _ in range(M)] if return_logits else None
    inter_cache = model.new_cache("inter") if use_cache else None
    intra_cache = model.new_cache("intra") if use_cache else None
    x = model.class_emb(lab)[:, None]  # inter input of position 0
    prefix = x
    for t in range(T):
        if use_cache:
            h = model.run_inter(x, start=t, cache=inter_cache)
        else:
            prefix = x if t == 0 else torch.cat([prefix, x], 1)
            h = model.run_inter(prefix)[:, -1:]
        y, intra_prefix, picked = h, h, []
        for m in range(M):
            if use_cache:
                o = model.run_intra(y, start=m, cache=intra_cache)[:, -1]
            else:
                intra_prefix = y if m == 0 else torch.cat([intra_prefix, y], 1)
                o = model.run_intra(intra_prefix)[:, -1]
            logits = model.heads[m](o).float()
            if guided:
                cond, uncond = logits.chunk(2)
                mixed = uncond + float(scales[m]) * (cond - uncond)
            else:
                cond = mixed = logits
            if kept is not None:
                kept[m].append(cond)
            sub = draw(mixed, float(temps[m]), int(ks[m]), float(ps[m]), generator)
            out[m][:, t] = sub
            picked.append(both(sub))
            if m < M - 1:
                y = model.tok_emb[m](picked[-1])[:, None]
        x = model.embed([p[:, None] for p in picked])
    indices = model.join(out).view(b, *cfg.grid)
    if return_logits:
        return indices, tuple(torch.stack(k, 1) for k in kept)
    return indices


# ---------------------------------------------------------------------------------------------- CLI


def to_uint8_truncated(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 as the official sampler saves: (x+1)/2*255, clip, truncate."""
    x = ((images.detach().float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` of a run with ``seed`` (distinct for distinct pairs while index < 1e6)."""
    return seed * 1_000_003 + index


def parse_floats(text: Optional[str], name: str):
    """A CLI value like '1.9,2.0' as a tuple of floats (None stays None); bad text exits with one line."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --{name} takes comma-separated numbers, got {text!r}") from None


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage2_ar.sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="AR checkpoint directory (kind 'ar')")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory (kind 'tokenizer')")
    p.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 0,1,2")
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (ADM format: uint8 NHWC, arr_0)")
    p.add_argument("--no-grid", action="store_true", help="skip the PNG grid (e.g. for 50k-sample runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", default=None, help="CFG scale(s), one or one per sub-token (default: checkpoint's)")
    p.add_argument("--temperature", default=None, help="temperature(s), one or one per sub-token")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or npu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    from shared.checkpoint import CheckpointError
    from shared.device import autocast, device_type
    from shared.runlog import image_grid, save_png
    from shared import atomic

    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip() != ""]
    except ValueError:
        raise SystemExit(f"error: --classes takes comma-separated integers, got {args.classes!r}") from None
    if not classes:
        raise SystemExit("error: --classes is empty")
    if args.per_class < 1 or args.batch_size < 1:
        raise SystemExit("error: --per-class and --batch-size must be positive")
    if args.no_grid and not args.npz:
        raise SystemExit("error: nothing to write (--no-grid without --npz)")
    for name in ("ckpt", "tokenizer"):
        if not Path(getattr(args, name)).is_dir():
            raise SystemExit(f"error: --{name} {getattr(args, name)} is not a directory")
    try:
        device = torch.device(device_type(args.device))
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    try:
        model = FactorizedAR.from_checkpoint(args.ckpt, device=device)
    except (CheckpointError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot load AR checkpoint: {e}") from None
    bad = [c for c in classes if not 0 <= c < model.cfg.num_classes]
    if bad:
        raise SystemExit(f"error: classes {bad} outside [0, {model.cfg.num_classes})")
    try:
        scales = per_subtoken(parse_floats(args.cfg, "cfg"), len(model.cfg.bits), "--cfg", model.cfg.cfg_scales or 1.0)
        temps = per_subtoken(parse_floats(args.temperature, "temperature"), len(model.cfg.bits), "--temperature",
                              model.cfg.temperatures or 1.0)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    try:
        from stage1_tokenizer.tokenizer import Tokenizer
    except ImportError as e:
        raise SystemExit(f"error: the Stage-1 tokenizer is not available: {e}") from None
    try:
        tokenizer = Tokenizer.from_checkpoint(args.tokenizer, device=device).eval()
    except (CheckpointError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot load tokenizer checkpoint: {e}") from None
    tok_bits = getattr(tokenizer, "bits", sum(model.cfg.bits))
    if tok_bits != sum(model.cfg.bits):
        raise SystemExit(f"error: tokenizer has {tok_bits}-bit tokens, AR model expects {sum(model.cfg.bits)}")

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.per_class)
    images = []  # uint8 NHWC per batch: 50k images at 256px stay under 10 GB
    for i in range(0, len(labels), args.batch_size):
        batch = labels[i:i + args.batch_size]
        # one generator per image, seeded by (seed, image number): the same image whatever the batch size
        gens = [torch.Generator().manual_seed(image_seed(args.seed, i + j)) for j in range(len(batch))]
        with autocast(device, args.precision):
            idx = generate(model, batch, cfg_scales=scales, temperatures=temps,
                           top_k=args.top_k, top_p=args.top_p, generator=gens)
        images.append(to_uint8_truncated(tokenizer.decode(idx, precision=args.precision)))
        print(f"sampled {i + len(batch)}/{len(labels)}", file=sys.stderr)
    images = np.concatenate(images)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_grid:
        as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_png(image_grid(as_float, nrow=args.per_class), out / "grid.png")
        print(f"wrote {out / 'grid.png'}")
    if args.npz:
        with atomic.atomic_path(out / "samples.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=images, labels=labels.numpy())
        print(f"wrote {out / 'samples.npz'} ({len(labels)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
