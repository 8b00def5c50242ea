"""Small real image folders for tests, benchmarks and demos (offline: scikit-image's bundled photos), and
one file of each kind of awkward input that a real crawl of ImageNet-like data contains.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def photos() -> Dict[str, np.ndarray]:
    import skimage.data as sd

    return {name: getattr(sd, name)() for name in PHOTOS}


def image_folder(root: str | Path, split: str = "train", classes: int = 3, per_class: int = 4,
                 seed: int = 0) -> List[Path]:
    """ROOT/<split>/class_k/*.jpg: random crops (varied sizes and aspect ratios) of the bundled photos."""
    rng = np.random.default_rng(seed)
    pics = list(photos().values())
    out = []
    for c in range(classes):
        d = Path(root) / split / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            a = pics[(c * per_class + j) % len(pics)]
            h, w = a.shape[:2]
            ch, cw = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            p = d / f"img_{c:02d}_{j:03d}.jpg"
            Image.fromarray(a[y:y + ch, x:x + cw]).save(p, quality=92)
            out.append(p)
    return out


def bad_files(folder: str | Path) -> Dict[str, str]:
    """Write one file of each awkward kind into ``folder``; returns {file name: expected outcome}.

    Outcomes: 'ok' (convertible to RGB) or the start of the failure reason.
    """
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    base = photos()["chelsea"][:120, :160]  # RGB uint8
    expect: Dict[str, str] = {}

    def save(name: str, img: Image.Image, outcome: str = "ok", **kw) -> None:
        img.save(d / name, **kw)
        expect[name] = outcome

    rgb = Image.fromarray(base)
    save("cmyk.jpg", rgb.convert("CMYK"), quality=90)
    save("gray.jpg", rgb.convert("L"), quality=90)
    save("rgba.png", rgb.convert("RGBA"))
    save("palette.png", rgb.convert("P", palette=Image.ADAPTIVE, colors=64))
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    save("palette_transparent.png", pal, transparency=0)
    save("gray_alpha.png", rgb.convert("LA"))
    g16 = (base[..., 1].astype(np.uint16) * 257)  # full 16-bit range
    save("gray16.png", Image.fromarray(g16))
    save("tiny.png", rgb.resize((3, 2)))
    save("huge.png", Image.new("RGB", (4096, 3072), (10, 200, 30)))
    save("one_pixel.png", rgb.resize((1, 1)), "too small")
    # Truncated JPEG: the first half of a valid file.
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.jpg"] = "corrupt"
    (d / "not_an_image.jpg").write_bytes(b"<html>this is a web page, not a JPEG</html>\n" * 20)
    expect["not_an_image.jpg"] = "not an image"
    (d / "empty.png").write_bytes(b"")
    expect["empty.png"] = "not an image"
    # A PNG whose pixel data is garbage after a valid header.
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[100:400] = bytes(300)
    (d / "corrupt_data.png").write_bytes(bytes(raw))
    expect["corrupt_data.png"] = "corrupt"
    return expect
