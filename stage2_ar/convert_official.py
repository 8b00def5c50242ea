"""Split an official Open-MAGVIT2 AR checkpoint into our AR checkpoint and our tokenizer checkpoint.

    python -m stage2_ar.convert_official AR_256_B.ckpt OUT_DIR      # -> OUT_DIR/ar, OUT_DIR/tokenizer

The official Lightning file holds ``transformer.*`` (the GPT) and ``first_stage_model.{encoder,decoder}.*``
(the frozen 16x tokenizer, raw weights, which the official sampler decodes with). The file is read with
``torch.load(weights_only=True)``. The transformer tensors are renamed one to one (no reshaping is needed:
the fused ``wqkv`` rows are [q | k | v], head-major, with adjacent rotary pairs, exactly as our blocks read
them); the tokenizer half goes through the Stage-1 converter. Both halves are loaded strictly: every tensor
of our models must be found and every official tensor of each half must be used.

Facts the shapes cannot tell: head_dim (64 in every official model) and the token grid (16x16 at 256px);
both are options. When the architecture is one of ar-B / ar-L / ar-XL, that preset (with its paper sampling
settings: CFG scales and temperatures per sub-token) is used.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from shared.checkpoint import CheckpointError, load_legacy, load_strict
from stage1_tokenizer.convert_official import state_dict_of
from stage2_ar.config import PRESETS, ARConfig
from stage2_ar.model import FactorizedAR

AR_PREFIX = "transformer."
TOKENIZER_PREFIX = "first_stage_model."
OFFICIAL_PRESETS = ("ar-B", "ar-L", "ar-XL")

# Our parameter name -> official name (without the "transformer." prefix); first match wins.
_RULES = [
    (r"^tok_emb\.0\.", "pre_emb."),
    (r"^tok_emb\.1\.", "post_emb."),
    (r"^class_emb\.", "class_emb.embedding_table."),
    (r"^inter\.(\d+)\.", r"spatial_blocks.\1."),
    (r"^intra\.(\d+)\.", r"factorized_blocks.\1."),
    (r"^heads\.(\d+)\.", r"head.\1."),
    (r"^norm\.", "norm."),
]
_LEAF_RULES = [(r"\.attn\.", ".attention."), (r"\.ffn\.", ".feed_forward."),
               (r"\.attn_norm\.", ".attention_norm."), (r"\.ffn_norm\.", ".ffn_norm.")]


def official_name(ours: str) -> str:
    """e.g. inter.3.attn.wqkv.weight -> spatial_blocks.3.attention.wqkv.weight."""
    for pattern, repl in _RULES:
        name, hit = re.subn(pattern, repl, ours)
        if hit:
            for p, r in _LEAF_RULES:
                name = re.sub(p, r, name)
            return name
    raise KeyError(f"no official name for parameter {ours!r}")


def official_key_map(cfg: ARConfig) -> Dict[str, str]:
    """Every key of our FactorizedAR(cfg) state_dict -> its official name (meta device: no memory)."""
    if tuple(cfg.bits) != (6, 12):
        raise ValueError(f"the official model only exists for bits (6, 12), not {cfg.bits}")
    with torch.device("meta"):
        keys = list(FactorizedAR(cfg).state_dict())
    return {k: official_name(k) for k in keys}


def _count(sd: Mapping[str, Tensor], fmt: str) -> int:
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def infer_config(sd: Mapping[str, Tensor], prefix: str = AR_PREFIX, head_dim: int = 64,
                 grid: Tuple[int, int] = (16, 16)) -> ARConfig:
    """Architecture from the tensor shapes; an official preset (with its sampling defaults) when one matches."""
    need = [prefix + k for k in ("pre_emb.weight", "post_emb.weight", "class_emb.embedding_table.weight",
                                 "spatial_blocks.0.feed_forward.w1.weight")]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(f"not an official AR checkpoint: {', '.join(absent[:2])} missing")
    pre, post = sd[need[0]], sd[need[1]]
    dim = pre.shape[1]
    bits = tuple(int(math.log2(t.shape[0])) for t in (pre, post))
    if dim % head_dim:
        raise CheckpointError(f"width {dim} is not a multiple of head_dim {head_dim}")
    arch = dict(bits=bits, grid=tuple(grid), num_classes=sd[need[2]].shape[0] - 1, dim=dim, n_head=dim // head_dim,
                n_inter=_count(sd, prefix + "spatial_blocks.{}.attention.wqkv.weight"),
                n_intra=_count(sd, prefix + "factorized_blocks.{}.attention.wqkv.weight"))
    for name in OFFICIAL_PRESETS:
        cfg = PRESETS[name]
        if all(getattr(cfg, k) == v for k, v in arch.items()):
            return cfg
    cfg = replace(ARConfig(), **arch).validate()
    hidden = sd[need[3]].shape[0]
    if cfg.ffn_hidden != hidden:  # some other rounding: find the multiple that reproduces it
        for mult in (256, 128, 64, 32, 16, 8, 1):
            if replace(cfg, ffn_multiple=mult).ffn_hidden == hidden:
                return replace(cfg, ffn_multiple=mult)
        raise CheckpointError(f"cannot reproduce the SwiGLU width {hidden} for dim {dim}")
    return cfg


def convert_ar_state(sd: Mapping[str, Tensor], cfg: ARConfig, prefix: str = AR_PREFIX) -> Dict[str, Tensor]:
    """Official ``transformer.*`` tensors -> our FactorizedAR state_dict (all found, all used)."""
    out, used, missing = {}, set(), []
    for ours, official in official_key_map(cfg).items():
        t = sd.get(prefix + official)
        if t is None:
            missing.append(prefix + official)
            continue
        used.add(prefix + official)
        out[ours] = t.detach().to("cpu").clone()
    if missing:
        raise CheckpointError(f"{len(missing)} official AR tensors missing (e.g. {', '.join(missing[:3])})")
    unused = sorted(k for k in sd if k.startswith(prefix) and k not in used)
    if unused:
        raise CheckpointError(f"{len(unused)} official AR tensors have no place in our model "
                              f"(e.g. {', '.join(unused[:3])})")
    return out


def convert(path, out_dir, *, grid=(16, 16), head_dim: int = 64, tokenizer_weights: str = "raw",
            tokenizer_preset: Optional[str] = None, skip_tokenizer: bool = False) -> Dict[str, Path]:
    """Convert one official AR file; returns {'ar': dir, 'tokenizer': dir (unless skipped)}.

    ``tokenizer_preset`` names the Stage-1 preset to load the tokenizer half into; by default it is inferred
    from the shapes (GroupNorm groups cannot be seen in them: 32, the official value, is assumed).
    """
    sd = state_dict_of(load_legacy(path))
    foreign = sorted(k for k in sd if not k.startswith((AR_PREFIX, TOKENIZER_PREFIX)))
    if foreign:
        raise CheckpointError(f"{len(foreign)} tensors belong to neither half (e.g. {', '.join(foreign[:3])})")
    cfg = infer_config(sd, head_dim=head_dim, grid=grid)
    model = FactorizedAR(cfg)
    load_strict(model, convert_ar_state(sd, cfg), source=str(path))
    out_dir = Path(out_dir)
    info = {"converted_from": Path(path).name, "format": "open-magvit2-official-lightning"}
    written = {"ar": model.save(out_dir / "ar", extra=info)}
    if not skip_tokenizer:
        # The Stage-1 converter does the tokenizer half (renames, DCR -> PixelShuffle permutation, strictness).
        from stage1_tokenizer.config import PRESETS as TOK_PRESETS
        from stage1_tokenizer.convert_official import convert_tokenizer_state, infer_config as tok_infer
        from stage1_tokenizer.tokenizer import Tokenizer

        if tokenizer_preset is not None and tokenizer_preset not in TOK_PRESETS:
            raise ValueError(f"unknown tokenizer preset {tokenizer_preset!r}; "
                             f"choose from {', '.join(sorted(TOK_PRESETS))}")
        tcfg = TOK_PRESETS[tokenizer_preset] if tokenizer_preset else tok_infer(sd, TOKENIZER_PREFIX, tokenizer_weights)
        tok = Tokenizer(tcfg)
        load_strict(tok, convert_tokenizer_state(sd, TOKENIZER_PREFIX, tokenizer_weights, tcfg), source=str(path))
        written["tokenizer"] = tok.save(out_dir / "tokenizer", extra={**info, "weights": tokenizer_weights})
    return written


def _grid(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --grid takes H,W, got {text!r}") from None
    return h, w


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stage2_ar.convert_official", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="official AR checkpoint (e.g. AR_256_B.ckpt)")
    p.add_argument("out", help="output directory: gets ar/ and tokenizer/ checkpoint directories")
    p.add_argument("--grid", default="16,16", help="token grid H,W (16,16 for the 256px models)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokenizer-weights", choices=("raw", "ema"), default="raw",
                   help="the AR file holds raw tokenizer weights (what the official sampler decodes with)")
    p.add_argument("--tokenizer-preset", default=None, help="Stage-1 preset of the tokenizer half (default: inferred)")
    p.add_argument("--skip-tokenizer", action="store_true", help="write only the AR half")
    args = p.parse_args(argv)
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"error: no such file: {args.ckpt}")
    try:
        written = convert(args.ckpt, args.out, grid=_grid(args.grid), head_dim=args.head_dim,
                          tokenizer_weights=args.tokenizer_weights, tokenizer_preset=args.tokenizer_preset,
                          skip_tokenizer=args.skip_tokenizer)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for kind, d in written.items():
        print(f"wrote {kind}: {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
