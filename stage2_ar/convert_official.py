"""Split an official Open-MAGVIT2 AR checkpoint into our AR checkpoint and our tokenizer checkpoint.

    python -m stage2_ar.convert_official AR_256_B.ckpt OUT_DIR      # -> OUT_DIR/ar, OUT_DIR/tokenizer
    python -m stage2_ar.convert_official hf://TencentARC/Open-MAGVIT2-AR-B-256-resolution OUT_DIR

The official Lightning file holds ``transformer.*`` (the GPT) and ``first_stage_model.{encoder,decoder}.*``
(the frozen 16x tokenizer, raw weights, which the official sampler decodes with). It is taken from a local
path or the Hugging Face Hub (``shared.model_ref``) and read by ``shared.legacy_checkpoint`` (tensors only;
other objects of the Lightning file stay inert records, no code runs). The transformer tensors are renamed
one to one (no reshaping is needed: the fused ``wqkv`` rows are [q | k | v], head-major, with adjacent
rotary pairs, exactly as our blocks read them); the tokenizer half goes through the Stage-1 converter. Both
halves are loaded strictly: every tensor of our models must be found and every official tensor of each half
must be used.

Facts the shapes cannot tell: head_dim and the token grid. The official file does not store its RoPE table
(``freqs_cis``, which would give both); when one is present it is used. Otherwise the architecture must be
one of the released ar-B / ar-L / ar-XL (head_dim 64, 16x16 grid at 256px), whose preset (with its paper
sampling settings: CFG scales and temperatures per sub-token) is used; any other file needs ``--grid H,W``
and ``--head-dim D`` (the official config's ``block_size`` = H*W, ``dim / n_head`` = D), or it is refused:
a guessed head count would give wrong logits without any error.

Outputs: OUT/ar and OUT/tokenizer are checked before the file is read, and an existing one is replaced only
if it is a checkpoint of that kind (or with ``--overwrite``); both halves are converted before either is
written.

``resolve_ar(ref)`` (behind ``FactorizedAR.from_pretrained``) turns any model reference into an AR checkpoint
directory, converting an official file once and caching both halves by the file's sha256.
"""
from __future__ import annotations

import argparse


def _parser() -> argparse.ArgumentParser:
    """The command line (light: built and parsed before the heavy imports below)."""
    p = argparse.ArgumentParser(prog="python -m stage2_ar.convert_official", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="official AR checkpoint: a file (e.g. AR_256_B.ckpt) or "
                                "hf://ORG/REPO[/FILE][@REVISION]")
    p.add_argument("out", help="output directory: gets ar/ and tokenizer/ checkpoint directories")
    p.add_argument("--grid", default=None, help="token grid H,W (released models: 16,16; needed for other files)")
    p.add_argument("--head-dim", type=int, default=None, help="dim / n_head (released models: 64; needed for others)")
    p.add_argument("--tokenizer-weights", choices=("raw", "ema"), default="raw",
                   help="the AR file holds raw tokenizer weights (what the official sampler decodes with)")
    p.add_argument("--tokenizer-preset", default=None, help="Stage-1 preset of the tokenizer half (default: inferred)")
    p.add_argument("--skip-tokenizer", action="store_true", help="write only the AR half")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT/ar and OUT/tokenizer even if they are not checkpoints of that kind")
    return p


if __name__ == "__main__":  # --help and argument errors answer before the heavy imports below
    _parser().parse_args()

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from shared import model_ref
from shared.checkpoint import CheckpointError, check_checkpoint_output, is_checkpoint, load_strict, save_checkpoint
from shared.legacy_checkpoint import load_state_dict
from shared.config import to_dict
from stage2_ar.config import PRESETS, ARConfig
from stage2_ar.model import CHECKPOINT_KIND, FactorizedAR

AR_PREFIX = "transformer."
TOKENIZER_PREFIX = "first_stage_model."
OFFICIAL_PRESETS = ("ar-B", "ar-L", "ar-XL")
RELEASED_GEOMETRY = ((16, 16), 64)  # grid and head_dim of every released AR model
ROPE_KEY = "freqs_cis"  # the official GPT's RoPE table (1 + H*W rows, head_dim/2 pairs, cos/sin); not in the releases

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


def rope_geometry(sd: Mapping[str, Tensor], prefix: str = AR_PREFIX) -> Optional[Tuple[Tuple[int, int], int]]:
    """(grid, head_dim) from a stored official RoPE table, or None when the file has none."""
    t = sd.get(prefix + ROPE_KEY)
    if t is None:
        return None
    side = math.isqrt(max(t.shape[0] - 1, 0)) if t.ndim == 3 else 0
    if t.ndim != 3 or t.shape[-1] != 2 or side < 1 or side * side != t.shape[0] - 1:
        raise CheckpointError(f"{prefix}{ROPE_KEY} of shape {tuple(t.shape)} is not an official 2D RoPE table "
                              f"(1 + side^2 rows, head_dim/2 pairs, 2)")
    return (side, side), 2 * t.shape[1]


def _released_preset(sd: Mapping[str, Tensor], prefix: str) -> Optional[str]:
    """The released model (ar-B / ar-L / ar-XL) whose architecture the tensors have, if any."""
    grid, head_dim = RELEASED_GEOMETRY
    try:
        cfg = infer_config(sd, prefix, head_dim=head_dim, grid=grid)
    except (CheckpointError, ValueError):  # e.g. a width that is no multiple of 64: not a release
        return None
    return next((n for n in OFFICIAL_PRESETS if PRESETS[n] == cfg), None)


def resolve_geometry(sd: Mapping[str, Tensor], grid: Optional[Tuple[int, int]] = None,
                     head_dim: Optional[int] = None, prefix: str = AR_PREFIX) -> Tuple[Tuple[int, int], int]:
    """The token grid and head_dim to build the model with: given, read from a stored RoPE table, or those of
    the released models when the architecture is one of them; anything else is ambiguous and refused."""
    given = (tuple(grid) if grid is not None else None, head_dim)
    stored = rope_geometry(sd, prefix)
    if stored is not None:
        for name, have, want in (("--grid", given[0], stored[0]), ("--head-dim", given[1], stored[1])):
            if have is not None and have != want:
                raise CheckpointError(f"{name} {have} contradicts the file's RoPE table ({prefix}{ROPE_KEY}: {want})")
        return stored
    if given[0] is not None and given[1] is not None:
        return given
    released = _released_preset(sd, prefix)
    if released is None:
        missing = " and ".join(f for f, v in (("--grid H,W", given[0]), ("--head-dim D", given[1])) if v is None)
        raise CheckpointError(f"not a released architecture (ar-B/L/XL) and the file stores no RoPE table: its token "
                              f"grid and head count cannot be inferred; pass {missing} (official config: "
                              f"block_size = H*W, dim / n_head = D)")
    return given[0] or RELEASED_GEOMETRY[0], given[1] or RELEASED_GEOMETRY[1]


def convert_ar_state(sd: Mapping[str, Tensor], cfg: ARConfig, prefix: str = AR_PREFIX) -> Dict[str, Tensor]:
    """Official ``transformer.*`` tensors -> our FactorizedAR state_dict (all found, all used; the RoPE table,
    recomputed by our model, is only checked by ``rope_geometry``)."""
    out, used, missing = {}, {prefix + ROPE_KEY}, []
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


def check_outputs(out_dir, *, skip_tokenizer: bool = False, overwrite: bool = False) -> Dict[str, Path]:
    """OUT/ar (and OUT/tokenizer) checked before any work: each may only replace a checkpoint of its kind."""
    out_dir = Path(out_dir)
    kinds = {"ar": CHECKPOINT_KIND}
    if not skip_tokenizer:
        from stage1_tokenizer.tokenizer import CHECKPOINT_KIND as TOKENIZER_KIND

        kinds["tokenizer"] = TOKENIZER_KIND
    return {name: check_checkpoint_output(out_dir / name, kind, overwrite=overwrite) for name, kind in kinds.items()}


def convert_halves(path, *, grid: Optional[Tuple[int, int]] = None, head_dim: Optional[int] = None,
                   tokenizer_weights: str = "raw", tokenizer_preset: Optional[str] = None,
                   skip_tokenizer: bool = False, source: Optional[Dict[str, object]] = None):
    """Read one official AR file and convert it, writing nothing: (model, cfg, tokenizer or None, info).

    ``grid`` / ``head_dim``: see ``resolve_geometry`` (None: inferred, or refused when the file cannot tell).
    ``tokenizer_preset`` names the Stage-1 preset to load the tokenizer half into; by default it is inferred
    from the shapes (GroupNorm groups cannot be seen in them: 32, the official value, is assumed).
    ``source``: the file's provenance record (``shared.model_ref``), stored with both halves.
    """
    from stage1_tokenizer.config import PRESETS as TOK_PRESETS

    if tokenizer_preset is not None and tokenizer_preset not in TOK_PRESETS:
        raise ValueError(f"unknown tokenizer preset {tokenizer_preset!r}; choose from {', '.join(sorted(TOK_PRESETS))}")
    sd = load_state_dict(path, show_progress=True)  # GBs for AR-XL: a bar with ETA
    foreign = sorted(k for k in sd if not k.startswith((AR_PREFIX, TOKENIZER_PREFIX)))
    if foreign:
        raise CheckpointError(f"{len(foreign)} tensors belong to neither half (e.g. {', '.join(foreign[:3])})")
    grid, head_dim = resolve_geometry(sd, grid, head_dim)
    cfg = infer_config(sd, head_dim=head_dim, grid=grid)
    model = FactorizedAR.empty(cfg)
    load_strict(model, convert_ar_state(sd, cfg), source=str(path))
    info = {"converted_from": Path(path).name, "format": "open-magvit2-official-lightning"}
    if source is not None:
        info["source"] = source
    tok = None
    if not skip_tokenizer:
        # The Stage-1 converter does the tokenizer half (renames, DCR -> PixelShuffle permutation, strictness).
        from stage1_tokenizer.convert_official import convert_tokenizer_state, infer_config as tok_infer
        from stage1_tokenizer.tokenizer import Tokenizer

        tcfg = TOK_PRESETS[tokenizer_preset] if tokenizer_preset else tok_infer(sd, TOKENIZER_PREFIX, tokenizer_weights)
        tok = Tokenizer.empty(tcfg)
        load_strict(tok, convert_tokenizer_state(sd, TOKENIZER_PREFIX, tokenizer_weights, tcfg), source=str(path))
    return model, cfg, tok, info


def _write_halves(model: FactorizedAR, cfg: ARConfig, tok, info, targets: Dict[str, Path],
                  tokenizer_weights: str = "raw", overwrite: bool = False) -> Dict[str, Path]:
    written = {"ar": save_checkpoint(targets["ar"], model.state_dict(), to_dict(cfg), kind=CHECKPOINT_KIND, extra=info,
                                     overwrite=overwrite, show_progress=True)}
    if tok is not None and "tokenizer" in targets:
        written["tokenizer"] = tok.save(targets["tokenizer"], extra={**info, "weights": tokenizer_weights},
                                        overwrite=overwrite, show_progress=True)
    return written


def convert(path, out_dir, *, grid: Optional[Tuple[int, int]] = None, head_dim: Optional[int] = None,
            tokenizer_weights: str = "raw", tokenizer_preset: Optional[str] = None, skip_tokenizer: bool = False,
            overwrite: bool = False) -> Dict[str, Path]:
    """Convert one official AR file (a local path or hf://...); returns {'ar': dir, 'tokenizer': dir (unless
    skipped)}. Arguments as ``convert_halves``."""
    targets = check_outputs(out_dir, skip_tokenizer=skip_tokenizer, overwrite=overwrite)
    source = model_ref.official_file(path)
    model, cfg, tok, info = convert_halves(source.path, grid=grid, head_dim=head_dim,
                                           tokenizer_weights=tokenizer_weights, tokenizer_preset=tokenizer_preset,
                                           skip_tokenizer=skip_tokenizer, source=source.record())
    # written only once both halves converted: a failure above leaves OUT as it was
    return _write_halves(model, cfg, tok, info, targets, tokenizer_weights, overwrite)


def resolve_ar(ref, *, grid: Optional[Tuple[int, int]] = None, head_dim: Optional[int] = None) -> model_ref.Resolved:
    """A model reference (checkpoint directory, official file, hf://...) -> an AR checkpoint directory.

    An official file is converted once into the cache (``shared.model_ref``): its AR half and, beside it, its
    tokenizer half (what ``Tokenizer.from_pretrained`` of the same reference finds). ``grid`` / ``head_dim``
    as ``resolve_geometry``: needed only for files that are neither released architectures nor carry a RoPE table.
    """
    variant = "-".join(["ar"] + ([f"grid{grid[0]}x{grid[1]}"] if grid else [])
                       + ([f"hd{head_dim}"] if head_dim else []))

    def run(file: Path, root: Path, source: Dict[str, object]) -> None:
        from stage1_tokenizer.tokenizer import CHECKPOINT_KIND as TOKENIZER_KIND

        model, cfg, tok, info = convert_halves(file, grid=grid, head_dim=head_dim, source=source)
        targets = {"ar": root / variant}
        if not is_checkpoint(root / "tokenizer", TOKENIZER_KIND):
            targets["tokenizer"] = root / "tokenizer"  # the default (raw) tokenizer half, as resolve_tokenizer names it
        _write_halves(model, cfg, tok, info, targets)

    return model_ref.resolve(ref, kind=CHECKPOINT_KIND, variant=variant, convert=run)


def _grid(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --grid takes H,W, got {text!r}") from None
    if h < 1 or w < 1:
        raise SystemExit(f"error: --grid sides must be positive, got {text!r}")
    return h, w


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not model_ref.is_hub_ref(args.ckpt) and not Path(args.ckpt).is_file():
        raise SystemExit(f"error: no such file: {args.ckpt}")
    if args.head_dim is not None and args.head_dim < 1:
        raise SystemExit(f"error: --head-dim must be positive, got {args.head_dim}")
    try:
        written = convert(args.ckpt, args.out, grid=_grid(args.grid), head_dim=args.head_dim,
                          tokenizer_weights=args.tokenizer_weights, tokenizer_preset=args.tokenizer_preset,
                          skip_tokenizer=args.skip_tokenizer, overwrite=args.overwrite)
    except (CheckpointError, ValueError) as e:  # OutputError is a ValueError
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # e.g. the disk filled up while writing: what was at OUT/ar, OUT/tokenizer stays
        raise SystemExit(f"error: cannot write {args.out}: {e.strerror or e}") from None
    for kind, d in written.items():
        print(f"wrote {kind}: {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
