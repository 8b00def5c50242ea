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
import math
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from stage2_ar import decoding
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


def _values(v) -> Tuple:
    return () if v is None else tuple(v) if isinstance(v, (tuple, list)) else (v,)


def check_sampling(cfg_scales=None, temperatures=None, top_k=0, top_p=1.0) -> None:
    """Refuse settings that would sample silently wrong (one value or one per sub-token each; None = default):
    top_p outside (0, 1] (0 masks every token: all-zero grids), a negative temperature (samples the inverted
    distribution), a negative or fractional top_k, a non-finite CFG scale or temperature. One-line ValueError."""
    for s in _values(cfg_scales):
        if not math.isfinite(float(s)):
            raise ValueError(f"CFG scale must be a finite number, got {s}")
    for t in _values(temperatures):
        if not (math.isfinite(float(t)) and float(t) >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = argmax) and finite, got {t}")
    for k in _values(top_k):
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k}")
    for q in _values(top_p):
        if not 0 < float(q) <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {q}")


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
    static: bool = False,
    compile: Optional[str] = None,
):
    """Sample token grids for ``labels`` (B,): returns (B, h, w) int64 18-bit indices on the model's device.

    cfg_scales / temperatures: one value or one per sub-token; None takes the model config's defaults
    (the paper's per-preset settings), else 1.0. guidance: None = use CFG when any scale differs from 1,
    True = always run the doubled batch, False = never. generator: one torch.Generator (any device) or a list
    of B generators, one per image (a seed per image: results independent of batching). use_cache=False
    recomputes the whole prefix at every step (the benchmark's baseline). static=True runs fixed-shape steps
    (``stage2_ar.decoding.Static``, reused across calls with the same batch), which ``compile`` (a
    ``torch.compile`` mode; "reduce-overhead" captures CUDA graphs) compiles. return_logits=True also returns
    the conditional logits that produced each sub-token (M tensors (B, h*w, V_m), fp32), to check them
    against a teacher-forced forward.
    """
    cfg = model.cfg
    M, T = len(cfg.bits), cfg.num_tokens
    scales = per_subtoken(cfg_scales, M, "cfg_scales", cfg.cfg_scales or 1.0)
    temps = per_subtoken(temperatures, M, "temperatures", cfg.temperatures or 1.0)
    ks = per_subtoken(top_k, M, "top_k", 0)
    ps = per_subtoken(top_p, M, "top_p", 1.0)
    check_sampling(scales, temps, ks, ps)
    guided = any(float(s) != 1.0 for s in scales) if guidance is None else bool(guidance)

    was_training = model.training
    model.eval()
    try:
        return _generate(model, labels, scales, temps, ks, ps, guided, generator, use_cache, return_logits,
                         static, compile)
    finally:
        model.train(was_training)


def _stepper(model, batch: int, use_cache: bool, static: bool, compile: Optional[str]):
    if compile is not None and not static:
        raise ValueError("compile needs static=True (fixed-shape decode steps)")
    if static:
        if not use_cache:
            raise ValueError("static=True is a KV-cache decoder; it cannot be combined with use_cache=False")
        key = (batch, decoding.cache_dtype(model, model.class_emb.weight.device), compile)
        per_model = model.__dict__.setdefault("_static_steppers", {})  # a plain attribute: not a submodule
        if key not in per_model:  # built (and compiled) once per batch size: later calls reuse the graphs
            per_model[key] = decoding.Static(model, batch, compile)
        return per_model[key]
    return decoding.Cached(model) if use_cache else decoding.Recompute(model)


def _generate(model, labels, scales, temps, ks, ps, guided, generator, use_cache, return_logits, static, compile):
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

    # every uniform of the run at once: no per-draw host-to-device copy (temperature 0 draws none)
    random_m = [m for m in range(M) if float(temps[m]) != 0]
    u_all = uniforms(b, T * len(random_m), generator, device)
    out = [torch.zeros(b, T, dtype=torch.long, device=device) for _ in range(M)]
    kept = [[] for _ in range(M)] if return_logits else None
    step = _stepper(model, lab.shape[0], use_cache, static, compile)
    x = model.class_emb(lab)[:, None]  # inter input of position 0
    for t in range(T):
        h = step.inter(x, t)
        y, picked = h, []
        head_in = model.norm(h)[:, -1] if model.independent_heads else None
        for m in range(M):
            # n_intra = 0: every head reads the inter output
            o = head_in if head_in is not None else step.intra(y, m)
            logits = model.heads[m](o).float()
            if guided:
                cond, uncond = logits.chunk(2)
                mixed = uncond + float(scales[m]) * (cond - uncond)
            else:
                cond = mixed = logits
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


# ---------------------------------------------------------------------------------------------- CLI


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


def check_seed(seed: int, n: int) -> None:
    """The per-image seeds ``image_seed(seed, i)``, i < n, must fit a torch generator (64 bits)."""
    if seed < 0 or image_seed(seed, n) >= 2 ** 64:
        raise ValueError(f"--seed must lie in [0, {(2 ** 64 - n) // 1_000_003}], got {seed}")


def check_cli_sampling(args: argparse.Namespace) -> None:
    """The sampling flags of this CLI and of stage2_ar.evaluate, checked before anything is loaded."""
    check_sampling(parse_floats(args.cfg, "cfg"), parse_floats(args.temperature, "temperature"), args.top_k, args.top_p)


def training_tokens(ar_meta) -> Optional[dict]:
    """What an AR checkpoint knows about the tokens it was trained on (``shared.token_dataset.tokens_record``):
    the record ``stage2_ar.train`` stores, else the manifest of its local training dataset, else None (e.g. a
    converted official checkpoint: nothing to check against)."""
    from shared import token_dataset as td

    extra = ar_meta.get("extra") or {}
    if isinstance(extra.get("tokens"), dict):
        return extra["tokens"]
    data = (extra.get("train_config") or {}).get("data") or {}
    path = data.get("path") if isinstance(data, dict) else None
    if not isinstance(path, str) or not path or td.is_remote(path) or not (Path(path) / td.MANIFEST).is_file():
        return None
    try:
        return td.tokens_record(td.read_manifest(path))
    except td.ManifestError:
        return None


def check_decoder(args: argparse.Namespace, model: FactorizedAR, tokenizer) -> None:
    """The tokenizer must decode this AR model's tokens: the same bit count and, unless
    ``--allow-tokenizer-mismatch``, the tokenizer of its training dataset. Exits with one line otherwise."""
    from shared import token_dataset as td
    from shared.checkpoint import load_meta

    if tokenizer.bits != sum(model.cfg.bits):
        raise SystemExit(f"error: tokenizer has {tokenizer.bits}-bit tokens, AR model expects {sum(model.cfg.bits)}")
    record = None if args.allow_tokenizer_mismatch else training_tokens(load_meta(args.ckpt))
    if record is not None:
        try:
            td.check_tokenizer(record, args.tokenizer, downsample_factor=tokenizer.downsample_factor,
                               allow="--allow-tokenizer-mismatch")
        except td.ManifestError as e:
            raise SystemExit(f"error: {e}") from None


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage2_ar.sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="AR checkpoint directory (kind 'ar')")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer checkpoint directory (kind 'tokenizer') that made the AR model's tokens")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="decode with --tokenizer even if it is not the tokenizer of the AR model's token dataset")
    p.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 0,1,2")
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--out", required=True, help="output directory (new, or one holding only this tool's files)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds other files")
    p.add_argument("--npz", action="store_true",
                   help="also write samples.npz (ADM layout, see stage2_ar.samples_npz: arr_0 images, arr_1 labels)")
    p.add_argument("--no-grid", action="store_true", help="skip the PNG grid (e.g. for 50k-sample runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", default=None, help="CFG scale(s), one or one per sub-token (default: checkpoint's)")
    p.add_argument("--temperature", default=None, help="temperature(s) >= 0, one or one per sub-token (0: argmax)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely sub-tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (1: off)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or npu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    from shared.checkpoint import CheckpointError
    from shared.device import autocast, device_type
    from shared.images import to_uint8_nhwc
    from shared.runlog import image_grid, save_png
    from stage2_ar.samples_npz import GRID_FILE, SAMPLES_FILE, check_output_dir, write_samples

    # Everything a user typed is checked before a model is loaded or a token sampled.
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
        check_cli_sampling(args)
        check_seed(args.seed, len(classes) * args.per_class)
        out = check_output_dir(args.out, overwrite=args.overwrite)
        device = torch.device(device_type(args.device))
    except (RuntimeError, ValueError) as e:  # OutputError is a ValueError
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
    check_decoder(args, model, tokenizer)

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.per_class)
    images = []  # uint8 NHWC per batch: 50k images at 256px stay under 10 GB
    for i in range(0, len(labels), args.batch_size):
        batch = labels[i:i + args.batch_size]
        # one generator per image, seeded by (seed, image number): the same image whatever the batch size
        gens = [torch.Generator().manual_seed(image_seed(args.seed, i + j)) for j in range(len(batch))]
        with autocast(device, args.precision):
            idx = generate(model, batch, cfg_scales=scales, temperatures=temps,
                           top_k=args.top_k, top_p=args.top_p, generator=gens)
        images.append(to_uint8_nhwc(tokenizer.decode(idx, precision=args.precision)))
        print(f"sampled {i + len(batch)}/{len(labels)}", file=sys.stderr)
    images = np.concatenate(images)

    try:
        out.mkdir(parents=True, exist_ok=True)
        if not args.no_grid:
            save_png(image_grid(images, nrow=args.per_class), out / GRID_FILE)  # the very pixels of the npz
            print(f"wrote {out / GRID_FILE}")
        if args.npz:
            write_samples(out / SAMPLES_FILE, images, labels.numpy())
            print(f"wrote {out / SAMPLES_FILE} ({len(labels)} images)")
    except OSError as e:  # e.g. the disk filled up: each file is written atomically, none is left torn
        raise SystemExit(f"error: cannot write {out}: {e.strerror or e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
