"""Image fixtures for tests: one file of each awkward kind a real crawl contains, and folders of small
real photo patches for the tokenizer trainer (offline: scikit-image's bundled photos)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from dataprep.sample_images import photo

TRAINER_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "cat", "motorcycle")


def export_skimage_photos(out_dir: Path, tile: Optional[int] = None, names: Sequence[str] = (),
                          size: Optional[int] = None) -> List[Path]:
    """Write bundled photos as PNGs; with ``tile`` each is cut into non-overlapping tile x tile patches
    (one file each), which turns a handful of photos into a few hundred small real images; with ``size`` each
    patch is resized (bicubic) to size x size, for the trainers' tiny configs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or TRAINER_PHOTOS:
        arr = photo(name)
        if tile is None:
            path = out_dir / f"{name}.png"
            Image.fromarray(arr).save(path)
            written.append(path)
            continue
        for r in range(arr.shape[0] // tile):
            for c in range(arr.shape[1] // tile):
                path = out_dir / f"{name}-{r:02d}-{c:02d}.png"
                patch = Image.fromarray(arr[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
                (patch.resize((size, size), Image.BICUBIC) if size else patch).save(path)
                written.append(path)
    return written


def bad_files(folder: str | Path) -> Dict[str, str]:
    """Write one file of each awkward kind into ``folder``; returns {file name: expected outcome}.

    Outcomes: 'ok' (convertible to RGB) or the start of the failure reason.
    """
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    base = photo("chelsea")[:120, :160]
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
