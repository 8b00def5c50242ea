"""Convert an official Open-MAGVIT2 tokenizer checkpoint (Lightning .ckpt) into our checkpoint format.

    python -m stage1_tokenizer.convert_official imagenet_256_L.ckpt runs/tok-official-256 --weights ema
    python -m stage1_tokenizer.convert_official hf://TencentARC/Open-MAGVIT2-Tokenizer-256-resolution OUT

What it does:
* takes the file from a local path or the Hugging Face Hub (``shared.model_ref``: hf://ORG/REPO[/FILE][@REV]);
* reads it with ``shared.legacy_checkpoint`` (tensors come out; any other object of a Lightning file stays an
  inert record, never code);
* picks the weight set: ``ema`` = the LitEma copies, stored as ``model_ema.<name with the dots removed>``
  (the official evaluation uses these), or ``raw`` = the plain ``encoder.*``/``decoder.*`` tensors (the official
  AR recipe encodes its tokens with these: convert with ``--weights raw`` to encode a dataset for AR training);
  the checkpoint written records the set (``extra["weights"]``, see ``stage1_tokenizer.exports``);
* infers the architecture from the tensor shapes and matches it to one of our presets;
* renames every tensor from the official module names to ours (one rule table, ``official_name``);
* permutes the upsampling convs: the official depth-to-space is DCR order (output pixel (dy, dx) of channel
  c reads input channel k*C + c, k = 2*dy + dx), ``nn.PixelShuffle`` is CRD order (input channel c*4 + k),
  so our channel c*4 + k takes the official channel k*C + c, for the weight rows and the bias alike;
* loads the result strictly into our model and writes a checkpoint directory (kind "tokenizer").

``convert_tokenizer_state`` is the reusable core: the Stage-2 converter calls it on the
``first_stage_model.`` part of an official AR checkpoint (which holds raw weights only).

``resolve_tokenizer(ref)`` (behind ``Tokenizer.from_pretrained``) turns any model reference into a tokenizer
checkpoint directory, converting an official file (a tokenizer release, or the tokenizer half of an AR
release) once and caching the result by the file's sha256.
"""
from __future__ import annotations

import argparse

WEIGHT_SETS = ("ema", "raw")


def _parser() -> argparse.ArgumentParser:
    """The command line (light: built and parsed before the heavy imports below)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="official tokenizer checkpoint: a .ckpt file or hf://ORG/REPO[/FILE][@REVISION]")
    p.add_argument("out", help="output checkpoint directory (an existing one is replaced only if it is a tokenizer "
                               "checkpoint, or with --overwrite)")
    p.add_argument("--weights", choices=WEIGHT_SETS, default="ema",
                   help="ema (default): the EMA weights, for reconstruction evaluation (what the official "
                        "evaluation uses); raw: the generator's weights, for encoding tokens for AR training (what "
                        "the official AR recipe encodes with and the official AR checkpoints carry). OUT records "
                        "the set (config.json extra.weights), and the token datasets encoded with it do")
    p.add_argument("--config", default=None, help="preset to use instead of inferring it from the shapes")
    p.add_argument("--overwrite", action="store_true", help="replace OUT even if it is not a tokenizer checkpoint")
    return p


if __name__ == "__main__":  # --help and argument errors answer before the heavy imports below
    _parser().parse_args()

import re
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from shared import model_ref
from shared.checkpoint import CheckpointError, check_checkpoint_output, load_strict
from shared.legacy_checkpoint import load_state_dict
from stage1_tokenizer.config import PRESETS, TokenizerConfig
from stage1_tokenizer.tokenizer import CHECKPOINT_KIND, Tokenizer

EMA_PREFIX = "model_ema."
AR_FILE_PREFIX = "first_stage_model."  # the tokenizer half of an official AR file (raw weights)

# Our module path -> official module path, applied in order to a full parameter name (first match wins for
# the module part; the residual-block leaf renames apply after it).
_MODULE_RULES = [
    (r"^encoder\.stem\.", "encoder.conv_in."),
    (r"^encoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.levels\.(\d+)\.down\.", r"encoder.down.\1.downsample."),
    (r"^encoder\.to_latent\.", "encoder.conv_out."),
    (r"^decoder\.from_latent\.", "decoder.conv_in."),
    (r"^decoder\.levels\.(\d+)\.adanorm\.to_scale\.", r"decoder.adaptive.\1.gamma."),
    (r"^decoder\.levels\.(\d+)\.adanorm\.to_shift\.", r"decoder.adaptive.\1.beta."),
    (r"^decoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"decoder.up.\1.block.\2."),
    (r"^decoder\.levels\.(\d+)\.up\.conv\.", r"decoder.up.\1.upsample.conv1."),
    (r"^decoder\.to_rgb\.", "decoder.conv_out."),
    (r"^(encoder|decoder)\.mid\.(\d+)\.", r"\1.mid_block.\2."),
    (r"^(encoder|decoder)\.out_norm\.", r"\1.norm_out."),
]
_BLOCK_RULES = [(r"\.norm_a\.", ".norm1."), (r"\.conv_a\.", ".conv1."), (r"\.norm_b\.", ".norm2."),
                (r"\.conv_b\.", ".conv2."), (r"\.skip\.", ".nin_shortcut.")]
_UPSAMPLE_CONV = re.compile(r"^decoder\.levels\.\d+\.up\.conv\.(weight|bias)$")


def official_name(ours: str) -> str:
    """Our parameter name -> the official one (e.g. decoder.levels.4.up.conv.weight -> decoder.up.4.upsample.conv1.weight)."""
    for pattern, repl in _MODULE_RULES:
        name, hit = re.subn(pattern, repl, ours)
        if hit:
            for p, r in _BLOCK_RULES:  # these leaf names exist only inside residual blocks
                name = re.sub(p, r, name)
            return name
    raise KeyError(f"no official name for parameter {ours!r}")


def ema_name(official: str) -> str:
    """LitEma buffer name of an official parameter: 'model_ema.' + the name with its dots removed."""
    return EMA_PREFIX + official.replace(".", "")


def official_key_map(cfg: TokenizerConfig) -> Dict[str, str]:
    """Every key of our Tokenizer(cfg) state_dict -> its official name (built on the meta device: no memory)."""
    with torch.device("meta"):
        keys = list(Tokenizer(cfg).state_dict())
    return {k: official_name(k) for k in keys}


def dcr_to_pixel_shuffle(t: Tensor) -> Tensor:
    """Reorder the output channels (dim 0, 4C of them) of a DCR depth-to-space conv for nn.PixelShuffle.

    DCR: channel k*C + c -> pixel k of channel c.  CRD (PixelShuffle): channel c*4 + k -> pixel k of channel c.
    """
    c4 = t.shape[0]
    if c4 % 4:
        raise ValueError(f"an x2 depth-to-space conv needs 4C output channels, got {c4}")
    return t.reshape(4, c4 // 4, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _getter(sd: Mapping[str, Tensor], prefix: str, weights: str) -> Callable[[str], Optional[Tensor]]:
    if weights == "raw":
        return lambda name: sd.get(prefix + name)
    return lambda name: sd.get(prefix + ema_name(name))


def _check_weights(weights: str) -> None:
    if weights not in WEIGHT_SETS:
        raise ValueError(f"weights must be one of {WEIGHT_SETS}, got {weights!r}")


def infer_config(official_sd: Mapping[str, Tensor], prefix: str = "", weights: str = "ema") -> TokenizerConfig:
    """Architecture from the tensor shapes: the first preset with that architecture (the official ones come
    first), else a custom config with the official 32 norm groups (group counts leave no trace in weights)."""
    _check_weights(weights)
    get = _getter(official_sd, prefix, weights)
    stem, latent, rgb = get("encoder.conv_in.weight"), get("encoder.conv_out.weight"), get("decoder.conv_out.weight")
    if stem is None or latent is None or rgb is None:
        where = f"{prefix}{EMA_PREFIX}*" if weights == "ema" else f"{prefix}encoder.*/decoder.*"
        hint = " (no EMA weights found: try --weights raw)" if weights == "ema" else ""
        raise CheckpointError(f"no official tokenizer weights under {where}{hint}")
    ch = stem.shape[0]
    mults = []
    while (w := get(f"encoder.down.{len(mults)}.block.0.conv1.weight")) is not None:
        mults.append(w.shape[0] // ch)
    blocks = 0
    while get(f"encoder.down.0.block.{blocks}.conv1.weight") is not None:
        blocks += 1
    arch = dict(in_channels=stem.shape[1], out_channels=rgb.shape[0], ch=ch, ch_mult=tuple(mults),
                num_res_blocks=blocks, z_channels=latent.shape[0])
    for cfg in PRESETS.values():
        if all(getattr(cfg, k) == v for k, v in arch.items()):
            return cfg
    return TokenizerConfig(preset="custom", **arch)


def convert_tokenizer_state(
    official_sd: Mapping[str, Tensor], prefix: str = "", weights: str = "ema", cfg: Optional[TokenizerConfig] = None
) -> Dict[str, Tensor]:
    """Official tokenizer tensors (under ``prefix``) -> a state_dict for our ``Tokenizer``.

    ``weights``: "ema" takes ``{prefix}model_ema.<dotless name>``, "raw" takes ``{prefix}encoder.*``/``decoder.*``.
    Every tensor of our model must be found, and every official encoder/decoder tensor of the chosen set must
    be used (other entries, e.g. the discriminator or the AR transformer, are ignored).
    """
    _check_weights(weights)
    cfg = cfg or infer_config(official_sd, prefix, weights)
    get = _getter(official_sd, prefix, weights)
    out, used, missing = {}, set(), []
    for ours, official in official_key_map(cfg).items():
        t = get(official)
        if t is None:
            missing.append(official)
            continue
        used.add(prefix + (official if weights == "raw" else ema_name(official)))
        t = t.detach().to("cpu")  # shares memory with the input except where permuted
        out[ours] = dcr_to_pixel_shuffle(t) if _UPSAMPLE_CONV.match(ours) else t
    if missing:
        raise CheckpointError(f"{len(missing)} official {weights} tensors missing (e.g. {', '.join(missing[:3])})")
    spaces = (prefix + "encoder.", prefix + "decoder.") if weights == "raw" else (
        prefix + EMA_PREFIX + "encoder", prefix + EMA_PREFIX + "decoder")
    unused = sorted(k for k in official_sd if k.startswith(spaces) and k not in used)
    if unused:
        raise CheckpointError(f"{len(unused)} official tensors have no place in our model (e.g. {', '.join(unused[:3])})")
    return out


def load_official(
    path: str | Path, weights: Optional[str] = "ema", cfg: Optional[TokenizerConfig] = None
) -> Tuple[Tokenizer, Dict[str, object]]:
    """Official .ckpt -> our Tokenizer (eval mode, strictly loaded) and a small provenance record.

    The tokenizer is found at the top of the state dict (a tokenizer release) or under ``first_stage_model.``
    (an AR release). ``weights=None`` picks the EMA weights when the file has them, else the raw ones.
    """
    sd = load_state_dict(path, show_progress=True)  # GBs for an AR release: a bar with ETA
    prefix = AR_FILE_PREFIX if any(k.startswith(AR_FILE_PREFIX) for k in sd) else ""
    if weights is None:
        weights = "ema" if any(k.startswith(prefix + EMA_PREFIX) for k in sd) else "raw"
    cfg = cfg or infer_config(sd, prefix, weights)
    model = Tokenizer.empty(cfg)
    load_strict(model, convert_tokenizer_state(sd, prefix, weights, cfg), source=str(path))
    info = {"converted_from": Path(path).name, "weights": weights, "format": "open-magvit2-official-lightning"}
    if prefix:
        info["prefix"] = prefix
    for key in ("model_ema.num_updates",):
        if key in sd:
            info[key] = int(sd[key])
    return model.eval(), info


def resolve_tokenizer(ref, weights: Optional[str] = None) -> model_ref.Resolved:
    """A model reference (checkpoint directory, official file, hf://...) -> a tokenizer checkpoint directory.

    ``weights``: "ema" / "raw", or None: EMA when the file has them (tokenizer releases), else raw (the
    tokenizer half of an AR release, which the official sampler decodes with).
    """
    if weights is not None:
        _check_weights(weights)
    variant = "tokenizer" if weights is None else f"tokenizer-{weights}"

    def convert(file: Path, root: Path, source: Dict[str, object]) -> None:
        model, info = load_official(file, weights)
        model.save(root / variant, extra={**info, "source": source}, show_progress=True)

    return model_ref.resolve(ref, kind=CHECKPOINT_KIND, variant=variant, convert=convert)


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if not model_ref.is_hub_ref(args.ckpt) and not Path(args.ckpt).is_file():
        raise SystemExit(f"error: no such file: {args.ckpt}")
    if args.config is not None and args.config not in PRESETS:
        raise SystemExit(f"error: unknown preset {args.config!r}; choose from {', '.join(sorted(PRESETS))}")
    try:
        check_checkpoint_output(args.out, CHECKPOINT_KIND, overwrite=args.overwrite)  # before reading the file
        source = model_ref.official_file(args.ckpt)
        model, info = load_official(source.path, args.weights, PRESETS.get(args.config))
        out = model.save(args.out, extra={**info, "source": source.record()}, overwrite=args.overwrite,
                         show_progress=True)
    except (CheckpointError, ValueError) as e:  # OutputError is a ValueError
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # e.g. the disk filled up while writing: the old OUT is still in place
        raise SystemExit(f"error: cannot write {args.out}: {e.strerror or e}") from None
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({model.cfg.preset}, {n:,} parameters, {args.weights} weights)")


if __name__ == "__main__":
    main()
