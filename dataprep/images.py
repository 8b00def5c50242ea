"""Robust image loading and the fixed crops ("views") that get tokenized.

Real image folders hold CMYK JPEGs, grayscale, palette and RGBA PNGs, 16-bit PNGs, truncated downloads
and files that are not images at all. ``load_rgb`` turns everything convertible into 8-bit RGB and raises
``BadImage`` with a one-line reason for the rest, so a pipeline can record the failure and carry on.

Views (one token grid each):
  center  resize the short side to R, centre crop R x R (the official val transform, ADM-style resize)
  flip    the centre crop mirrored left-right (LlamaGen stores both)
  tencrop LlamaGen's ten-crop: centre crop at 1.1 R, then the four corners and the centre at R, and the
          mirror images of those five (torchvision TenCrop order)
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile

# Refuse absurd pixel counts instead of decoding them (a decompression bomb can take tens of GB).
MAX_PIXELS = 1 << 28  # 268M pixels, e.g. 16k x 16k
# PIL warns above its own limit (89M) and refuses above twice that; we check MAX_PIXELS ourselves, so
# raise PIL's limit to match (its refusal then starts at 2 * MAX_PIXELS, reported as "too large" too).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
MIN_SIDE = 2  # a 1-pixel-wide image carries no usable content for a crop
TENCROP_RANGE = 1.1  # LlamaGen extract_codes: crop_range 1.1 before TenCrop
VIEW_SETS = {
    "center": ["center"],
    "flip": ["flip"],
    "tencrop": [f"ten-{k}{f}" for f in ("", "-flip") for k in ("tl", "tr", "bl", "br", "c")],
}


class BadImage(ValueError):
    """An input that cannot be turned into an RGB image; the message is the reason recorded."""


def expand_views(spec: Sequence[str] | str) -> List[str]:
    """'center,flip' -> ['center', 'flip']; 'tencrop' -> its ten names. Order defines the view index."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for name in (n.strip() for n in names):
        if name not in VIEW_SETS:
            raise ValueError(f"unknown view {name!r}; choose from {', '.join(VIEW_SETS)}")
        out += VIEW_SETS[name]
    if len(set(out)) != len(out):
        raise ValueError(f"views repeat: {out}")
    return out


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float single-channel images: scale to 8 bits instead of clipping."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a
    else:  # I;16 variants and I: PNG 16-bit data lands here; treat the range as 16 bits
        a = a.astype(np.float64) / 257.0
    a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    return Image.fromarray(a, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB. Transparent pixels are composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_depth_to_rgb(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | Path | BinaryIO) -> Image.Image:
    """Decode a file (a path, or a binary file object: an image's bytes from a shard or S3) fully into an RGB
    image or raise BadImage(reason)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not a grey-padded image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below decides
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise BadImage(f"too large: {w}x{h} pixels > {MAX_PIXELS}")
                if min(w, h) < MIN_SIDE:
                    raise BadImage(f"too small: {w}x{h}")
                img.load()
                return to_rgb(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unidentified format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(f"corrupt: {msg}") from None
    except Exception as e:  # decoders of malformed files also raise struct.error, IndexError, ...
        raise BadImage(f"corrupt: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Short side -> ``size``: box-halve while at least twice too large, then bicubic (ADM/LlamaGen)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    new = tuple(max(size, round(s * scale)) for s in img.size)
    return img.resize(new, resample=Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _tencrop(img: Image.Image, size: int) -> dict:
    w, h = img.size
    boxes = {
        "tl": (0, 0), "tr": (w - size, 0), "bl": (0, h - size), "br": (w - size, h - size),
        "c": ((w - size) // 2, (h - size) // 2),
    }
    out = {f"ten-{k}": img.crop((x, y, x + size, y + size)) for k, (x, y) in boxes.items()}
    out.update({f"{k}-flip": v.transpose(Image.FLIP_LEFT_RIGHT) for k, v in list(out.items())})
    return out


def make_views(img: Image.Image, resolution: int, views: Sequence[str]) -> np.ndarray:
    """(V, R, R, 3) uint8 crops of an RGB image, in the order of ``views``."""
    crops = {}
    if any(v.startswith("ten-") for v in views):
        big = int(resolution * TENCROP_RANGE)
        crops.update(_tencrop(center_crop(resize_short_side(img, big), big), resolution))
    if "center" in views or "flip" in views:
        c = center_crop(resize_short_side(img, resolution), resolution)
        crops["center"] = c
        crops["flip"] = c.transpose(Image.FLIP_LEFT_RIGHT)
    return np.stack([np.asarray(crops[v], dtype=np.uint8) for v in views])


def load_views(path: str | Path | BinaryIO, resolution: int, views: Sequence[str]) -> np.ndarray:
    """load_rgb + make_views; raises BadImage."""
    return make_views(load_rgb(path), resolution, views)


def to_model_input(crops: np.ndarray):
    """(N, R, R, 3) uint8 -> (N, 3, R, R) float32 torch tensor in [-1, 1] (x / 127.5 - 1, as official)."""
    import torch

    x = torch.from_numpy(np.array(crops, dtype=np.uint8)).permute(0, 3, 1, 2).float()  # copy: may be read-only
    return x / 127.5 - 1.0


def describe(path: str | Path) -> Tuple[str, Tuple[int, int]]:
    """(mode, size) of a file without decoding pixels; for messages and tests."""
    with Image.open(path) as img:
        return img.mode, img.size
