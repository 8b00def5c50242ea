"""Reconstruct images through a tokenizer and write what came out, with PSNR / SSIM per image.

    python -m stage1_tokenizer.reconstruct --tokenizer hf://TencentARC/Open-MAGVIT2-Tokenizer-128-resolution \
        photos/ --out recon/ [--size 256]

IMAGE_OR_FOLDER is one image or a folder (every image under it, recursively, hidden ones skipped). DIR gets,
for each image (``<name>``: its path under the folder without the suffix; with the suffix where two would
collide):

    reconstructions/<name>.png   the decoded image
    side_by_side/<name>.png      input | reconstruction
    tokens/<name>.npy            the token indices, (h, w) int64, index = sum_c [z_c > 0] 2^c
    metrics.json                 per-image PSNR / SSIM, their means, the tokenizer's provenance

Metrics are the project's (``stage1_tokenizer.metrics``, the evaluation's): on the uint8 images
(``shared.images.to_uint8``), PSNR in dB, SSIM with skimage's defaults (null for sides under 7 px).

Sizes: the networks are fully convolutional, so any height and width that are multiples of the tokenizer's
downsampling factor work (the 128-trained 8x model runs at 256 and 512 too). Without ``--size`` every image
must have such a size (checked for all images before any work); ``--size N`` resizes the shorter side to N
and centre-crops N x N, as the evaluation does.

DIR must be new, empty, or an earlier output of this tool (nothing but the names above in it); anything else
is refused unless ``--overwrite``, which writes these files into it and leaves the others alone. Each file
is written atomically. The tokenizer is any model reference (``shared.model_ref``).
"""
from __future__ import annotations

import argparse

TOOL = "stage1_tokenizer.reconstruct"


def _parser() -> argparse.ArgumentParser:
    """The command line (light: built and parsed before the heavy imports below)."""
    p = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n")[0])
    p.add_argument("input", metavar="IMAGE_OR_FOLDER", help="an image, or a folder of images (recursive)")
    p.add_argument("--tokenizer", required=True,
                   help="a tokenizer checkpoint directory, an official .ckpt, or hf://ORG/REPO[/FILE][@REVISION]")
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier output of this tool)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds other files (they are left alone)")
    p.add_argument("--size", type=int, default=None,
                   help="resize the shorter side to N and centre-crop N x N (N a multiple of the downsampling factor)")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="for an official file: EMA or raw weights (default: EMA when the file has them)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto", help="auto, cuda, npu or cpu")
    return p


if __name__ == "__main__":  # --help and argument errors answer before the heavy imports below
    _parser().parse_args()

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shared import atomic
from shared.checkpoint import CheckpointError, error_line
from shared.image_files import IMAGE_EXTENSIONS, is_image_file
from shared.images import to_uint8
from stage1_tokenizer.data import crop_box, resize_shorter, to_tensor
from stage1_tokenizer.metrics import psnr_per_image, ssim_per_image

RECONSTRUCTIONS, SIDE_BY_SIDE, TOKENS, METRICS = "reconstructions", "side_by_side", "tokens", "metrics.json"
OUTPUTS = (RECONSTRUCTIONS, SIDE_BY_SIDE, TOKENS, METRICS)
_TEMPORARY = re.compile(r"^\.metrics\.json\..+\.tmp$")
SSIM_MIN_SIDE = 7  # the SSIM window


class InputError(ValueError):
    """Bad input (missing, no images, unreadable, a size the network does not take): one-line message."""


def _is_our_metrics(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def is_output_dir(path: Path) -> bool:
    """Whether ``path`` holds nothing but what this tool writes (so it may write there again)."""
    return all(_is_our_metrics(p) if p.name == METRICS else p.name in OUTPUTS or _TEMPORARY.match(p.name)
               for p in Path(path).iterdir())


def list_images(src: Path, out: Optional[Path] = None) -> List[Tuple[Path, str]]:
    """(image, output name) pairs, sorted by path; ``out`` (the output directory) is never read as input."""
    if src.is_file():
        if not is_image_file(src.name):
            raise InputError(f"{src} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [(src, src.stem)]
    if not src.is_dir():
        raise InputError(f"no such file or directory: {src}")
    skip = out.resolve() if out is not None else None
    files = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not is_image_file(p.name) or not p.is_file():
            continue
        if skip is not None and (skip == p.resolve().parent or skip in p.resolve().parents):
            continue
        files.append((p, rel))
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {src}")
    stems = [rel.with_suffix("").as_posix() for _, rel in files]
    return [(p, stem if stems.count(stem) == 1 else rel.as_posix()) for (p, rel), stem in zip(files, stems)]


def _size_hint(w: int, h: int, factor: int) -> str:
    crop = f"{max(w // factor, 1) * factor}x{max(h // factor, 1) * factor}"
    examples = ", ".join(str(n) for n in (128, 256, 512) if n % factor == 0) or str(factor * 16)
    return (f"the tokenizer takes sides that are multiples of {factor} (e.g. {crop}); pass --size N, N a multiple "
            f"of {factor} (e.g. {examples}), to resize the shorter side to N and centre-crop N x N")


def check_sizes(images: List[Tuple[Path, str]], factor: int, size: Optional[int]) -> None:
    """Before any work: every image opens, and is (or will be made) a size the network takes."""
    for path, _ in images:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"cannot read {path}: {error_line(e)}") from None
        if size is None and (w % factor or h % factor):
            raise InputError(f"{path} is {w}x{h}: {_size_hint(w, h, factor)}")
        if size is not None and min(w, h) < 1:
            raise InputError(f"{path} is empty ({w}x{h})")


def load_image(path: Path, size: Optional[int]) -> torch.Tensor:
    """(3, H, W) in [-1, 1]; with ``size``: shorter side resized to it, centre crop size x size."""
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot read {path}: {error_line(e)}") from None
    if size is not None:
        img = resize_shorter(img, size)
        img = img.crop(crop_box(*img.size, size, None))
    return to_tensor(img)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def reconstruct_one(tok, x: torch.Tensor, precision: str = "fp32") -> Dict[str, Any]:
    """One image (3, H, W) in [-1, 1] -> indices (h, w), uint8 input and reconstruction (H, W, 3), metrics."""
    device = next(tok.parameters()).device
    idx = tok.encode(x[None].to(device), precision=precision)
    rec = tok.decode(idx, precision=precision).float().clamp(-1, 1).cpu()
    a, b = to_uint8(x[None]), to_uint8(rec)
    small = min(x.shape[1:]) < SSIM_MIN_SIDE
    return {"indices": idx[0].cpu().numpy().astype(np.int64),
            "input": a[0].permute(1, 2, 0).numpy(), "reconstruction": b[0].permute(1, 2, 0).numpy(),
            "psnr": float(psnr_per_image(a, b)[0]), "ssim": None if small else float(ssim_per_image(a, b)[0])}


def run(tok, images: List[Tuple[Path, str]], out: Path, size: Optional[int] = None, precision: str = "fp32",
        provenance: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Reconstruct ``images`` into ``out`` (already checked); returns (and writes) the metrics record."""
    rows = []
    for path, name in images:
        r = reconstruct_one(tok, load_image(path, size), precision)
        files = {RECONSTRUCTIONS: f"{RECONSTRUCTIONS}/{name}.png", SIDE_BY_SIDE: f"{SIDE_BY_SIDE}/{name}.png",
                 TOKENS: f"{TOKENS}/{name}.npy"}
        _write_png(out / files[RECONSTRUCTIONS], r["reconstruction"])
        _write_png(out / files[SIDE_BY_SIDE], np.concatenate([r["input"], r["reconstruction"]], axis=1))
        _write_npy(out / files[TOKENS], r["indices"])
        h, w = r["input"].shape[:2]
        rows.append({"image": str(path), "name": name, "height": h, "width": w, "token_grid": list(r["indices"].shape),
                     "psnr": r["psnr"], "ssim": r["ssim"], **files})
    ssims = [r["ssim"] for r in rows if r["ssim"] is not None]
    record = {"tool": TOOL, "tokenizer": provenance, "size": size, "precision": precision, "images": rows,
              "mean": {"psnr": float(np.mean([r["psnr"] for r in rows])),
                       "ssim": float(np.mean(ssims)) if ssims else None}}
    atomic.write_text(out / METRICS, json.dumps(record, indent=2) + "\n")
    return record


def format_table(record: Dict[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    rows = [(r["name"], f"{r['width']}x{r['height']}", "x".join(map(str, r["token_grid"])), fmt(r["psnr"]),
             fmt(r["ssim"])) for r in record["images"]]
    rows.append(("mean", "", "", fmt(record["mean"]["psnr"]), fmt(record["mean"]["ssim"])))
    head = ("image", "size", "tokens", "psnr_db", "ssim")
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows])


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = _parser().parse_args(argv)

    from shared.device import device_type
    from stage1_tokenizer.tokenizer import Tokenizer

    if args.size is not None and args.size < 1:
        raise SystemExit(f"error: --size must be positive, got {args.size}")
    out = Path(args.out)
    what = f"an output directory of {TOOL} ({', '.join(OUTPUTS)})"
    try:
        images = list_images(Path(args.input), out)
        atomic.check_output_dir(out, owned=(lambda _: True) if args.overwrite else is_output_dir, replaced=False,
                                what=what)
        device = torch.device(device_type(args.device))
    except (InputError, RuntimeError, ValueError) as e:  # OutputError is a ValueError
        raise SystemExit(f"error: {e}") from None
    try:
        tok = Tokenizer.from_pretrained(args.tokenizer, device=device, weights=args.weights)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load tokenizer from {args.tokenizer}: {e}") from None
    factor = tok.downsample_factor
    if args.size is not None and args.size % factor:
        raise SystemExit(f"error: --size {args.size} is not a multiple of the tokenizer's downsampling factor "
                         f"{factor} (e.g. {', '.join(str(n) for n in (128, 256, 512) if n % factor == 0)})")
    try:
        check_sizes(images, factor, args.size)
        record = run(tok, images, out, args.size, args.precision, tok.provenance)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # e.g. the disk filled up: every file written so far is whole
        raise SystemExit(f"error: cannot write {out}: {e.strerror or e}") from None
    print(format_table(record))
    print(f"wrote {len(record['images'])} reconstructions to {out}")
    return record


if __name__ == "__main__":
    main()
