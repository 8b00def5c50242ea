"""The sampling CLI: class-conditional images from an AR model, decoded by its Stage-1 tokenizer.

    python -m stage2_ar.sample --ckpt hf://TencentARC/Open-MAGVIT2-AR-B-256-resolution --classes 207,360,387 \
        --per-class 4 --out DIR [--tokenizer REF] [--npz] [--seed 0] [--cfg 1.9,2.0] [--temperature 1.0,1.0] \
        [--top-k 0,0] [--top-p 1.0,1.0]

``--ckpt`` and ``--tokenizer`` take model references (``shared.model_ref``): a checkpoint directory of ours
(or a converter's OUT holding ar/ and tokenizer/), an official ``.ckpt`` or ``hf://ORG/REPO[/FILE][@REV]``
(converted once and cached). Without ``--tokenizer`` the tokenizer comes from the ``--ckpt`` reference: the
tokenizer half of an official AR file, or OUT/tokenizer. ``--cfg``, ``--temperature``, ``--top-k`` and
``--top-p`` take one value for every sub-token or one per sub-token (the official sampler's ``-k 0,0 -p
1.0,1.0``); CFG guides the sub-tokens whose scale is > 1 (``stage2_ar.generate``).

Checks what the user typed, the models and the tokenizer's identity, then runs
``stage2_ar.generate.generate_images`` (image i of the class-major list draws from its own generator seeded
with ``image_seed(seed, i)``) and writes the grid and ``samples.npz``. The grid PNG carries the provenance
of the run (both models' resolved references, ``Resolved.record()``, and the sampling settings) as its
``provenance`` text chunk. The sampling algorithm is ``stage2_ar.generate``.
"""
from __future__ import annotations

import argparse

from stage2_ar.sample_args import add_model_args, add_sampling_args


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage2_ar.sample", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 0,1,2")
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--out", required=True, help="output directory (new, or one holding only this tool's files)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds other files")
    p.add_argument("--npz", action="store_true",
                   help="also write samples.npz (ADM layout, see stage2_ar.samples_npz: arr_0 images, arr_1 labels)")
    p.add_argument("--no-grid", action="store_true", help="skip the PNG grid (e.g. for 50k-sample runs)")
    p.add_argument("--seed", type=int, default=0)
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or npu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and argument errors answer before the heavy imports below
    _parse_args()

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from stage2_ar.generate import check_sampling, generate_images, image_seed, per_subtoken
from stage2_ar.model import FactorizedAR

PROVENANCE_KEY = "provenance"  # the grid PNG's text chunk holding the run's provenance (JSON)


def parse_floats(text: Optional[str], name: str):
    """A CLI value like '1.9,2.0' as a tuple of floats (None stays None); bad text exits with one line."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --{name} takes comma-separated numbers, got {text!r}") from None


def parse_top_k(text: Optional[str]):
    """--top-k as a tuple of numbers, integral ones as ints (a fractional one is left for ``check_sampling``
    to refuse with its value)."""
    values = parse_floats(text, "top-k")
    return None if values is None else tuple(int(v) if v.is_integer() else v for v in values)


def check_seed(seed: int, n: int) -> None:
    """The per-image seeds ``image_seed(seed, i)``, i < n, must fit a torch generator (64 bits)."""
    if seed < 0 or image_seed(seed, n) >= 2 ** 64:
        raise ValueError(f"--seed must lie in [0, {(2 ** 64 - n) // 1_000_003}], got {seed}")


def check_cli_sampling(args: argparse.Namespace) -> None:
    """The sampling flags of this CLI and of stage2_ar.evaluate, checked before anything is loaded."""
    check_sampling(parse_floats(args.cfg, "cfg"), parse_floats(args.temperature, "temperature"),
                   parse_top_k(args.top_k), parse_floats(args.top_p, "top-p"))


def cli_sampling(args: argparse.Namespace, model: FactorizedAR) -> Dict[str, tuple]:
    """--cfg, --temperature, --top-k and --top-p, one value per sub-token (CFG and temperature default to the
    checkpoint's), checked (``check_sampling``): the keywords of ``generate_images``. ValueError if one is
    mis-sized or refused."""
    m, cfg = len(model.cfg.bits), model.cfg
    out = {"cfg_scales": per_subtoken(parse_floats(args.cfg, "cfg"), m, "--cfg", cfg.cfg_scales or 1.0),
           "temperatures": per_subtoken(parse_floats(args.temperature, "temperature"), m, "--temperature",
                                        cfg.temperatures or 1.0),
           "top_k": per_subtoken(parse_top_k(args.top_k), m, "--top-k", 0),
           "top_p": per_subtoken(parse_floats(args.top_p, "top-p"), m, "--top-p", 1.0)}
    check_sampling(**out)
    return out


def check_reference(name: str, ref: Optional[str]) -> None:
    """A model reference as typed, before anything is loaded: an hf:// reference must parse, a local one
    exist (a directory, or an official file). Exits with one line."""
    from shared import model_ref

    if ref is None:
        return
    if model_ref.is_hub_ref(ref):
        try:
            model_ref.parse_hub_ref(ref)
        except model_ref.ModelRefError as e:
            raise SystemExit(f"error: --{name} {e}") from None
    elif not Path(ref).expanduser().exists():
        raise SystemExit(f"error: --{name} {ref} is not a directory or a file (give a checkpoint directory, an "
                         f"official .ckpt or hf://ORG/REPO[/FILE][@REVISION])")


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
    ``--allow-tokenizer-mismatch``, the tokenizer of its training dataset. Exits with one line otherwise.
    The checkpoints are those the references resolved to (``model.provenance``), else the paths given."""
    from shared import token_dataset as td
    from shared.checkpoint import load_meta

    if tokenizer.bits != sum(model.cfg.bits):
        raise SystemExit(f"error: tokenizer has {tokenizer.bits}-bit tokens, AR model expects {sum(model.cfg.bits)}")
    ar_dir = (getattr(model, "provenance", None) or {}).get("checkpoint", args.ckpt)
    record = None if args.allow_tokenizer_mismatch else training_tokens(load_meta(ar_dir))
    if record is not None:
        tok_dir = (getattr(tokenizer, "provenance", None) or {}).get("checkpoint", args.tokenizer)
        try:
            td.check_tokenizer(record, tok_dir, downsample_factor=tokenizer.downsample_factor,
                               allow="--allow-tokenizer-mismatch")
        except td.ManifestError as e:
            raise SystemExit(f"error: {e}") from None


def load_ar(args: argparse.Namespace, device) -> FactorizedAR:
    """The AR model of the ``--ckpt`` reference (``from_pretrained``: its ``provenance`` says what the reference
    resolved to). One-line exit."""
    from shared.checkpoint import CheckpointError

    try:
        return FactorizedAR.from_pretrained(args.ckpt, device=device)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"error: cannot load AR checkpoint: {e}") from None


def load_decoder(args: argparse.Namespace, model: FactorizedAR, device):
    """The tokenizer of the ``--tokenizer`` reference (default: the ``--ckpt`` one) through ``from_pretrained``,
    checked to decode ``model``'s tokens (``check_decoder``). One-line exits."""
    from shared.checkpoint import CheckpointError

    try:
        from stage1_tokenizer.tokenizer import Tokenizer
    except ImportError as e:
        raise SystemExit(f"error: the Stage-1 tokenizer is not available: {e}") from None
    ref = args.tokenizer if args.tokenizer is not None else args.ckpt
    try:
        tokenizer = Tokenizer.from_pretrained(ref, device=device).eval()
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        hint = "" if args.tokenizer is not None else (f" (no --tokenizer given: looked for the tokenizer of --ckpt "
                                                      f"{args.ckpt}; pass --tokenizer REF)")
        raise SystemExit(f"error: cannot load tokenizer checkpoint: {e}{hint}") from None
    check_decoder(args, model, tokenizer)
    return tokenizer


def models_record(args: argparse.Namespace, model: FactorizedAR, tokenizer) -> Dict[str, Any]:
    """Where the models came from, for a run's provenance: the references as given and what they resolved to."""
    return {"ckpt": str(args.ckpt), "ckpt_source": getattr(model, "provenance", None),
            "tokenizer": str(args.tokenizer if args.tokenizer is not None else args.ckpt),
            "tokenizer_source": getattr(tokenizer, "provenance", None)}


def main(argv=None) -> int:
    args = _parse_args(argv)
    from shared.device import device_type
    from shared.runlog import image_grid, save_png
    from stage2_ar.samples_npz import GRID_FILE, SAMPLES_FILE, check_samples_output, write_samples

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
        check_reference(name, getattr(args, name))
    try:
        check_cli_sampling(args)
        check_seed(args.seed, len(classes) * args.per_class)
        out = check_samples_output(args.out, overwrite=args.overwrite)
        device = torch.device(device_type(args.device))
    except (RuntimeError, ValueError) as e:  # OutputError is a ValueError
        raise SystemExit(f"error: {e}") from None

    model = load_ar(args, device)
    bad = [c for c in classes if not 0 <= c < model.cfg.num_classes]
    if bad:
        raise SystemExit(f"error: classes {bad} outside [0, {model.cfg.num_classes})")
    try:
        sampling = cli_sampling(args, model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = load_decoder(args, model, device)

    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.per_class)

    def report(batches):  # images sampled and decoded, with an ETA (shared.progress)
        from shared.progress import progress

        bar = progress(desc="sample", total=len(labels), unit="img")
        for start, stop in batches:
            yield start, stop
            bar.update(stop - start)
        bar.close()

    # one generator per image, seeded by (seed, image number): the same image whatever the batch size
    images = generate_images(model, tokenizer, labels, seed=args.seed, batch_size=args.batch_size,
                             precision=args.precision, decode_precision=args.precision, uint8=True,
                             progress=report, **sampling).images
    provenance = {**models_record(args, model, tokenizer), "classes": classes, "per_class": args.per_class,
                  "seed": args.seed, **{k: list(v) for k, v in sampling.items()}, "precision": args.precision}

    try:
        out.mkdir(parents=True, exist_ok=True)
        if not args.no_grid:  # the very pixels of the npz, with the run's provenance as a text chunk
            save_png(image_grid(images, nrow=args.per_class), out / GRID_FILE,
                     text={PROVENANCE_KEY: json.dumps(provenance)})
            print(f"wrote {out / GRID_FILE}")
        if args.npz:
            write_samples(out / SAMPLES_FILE, images, labels.numpy())
            print(f"wrote {out / SAMPLES_FILE} ({len(labels)} images)")
    except OSError as e:  # e.g. the disk filled up: each file is written atomically, none is left torn
        raise SystemExit(f"error: cannot write {out}: {e.strerror or e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
