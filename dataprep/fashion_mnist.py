"""Turn Fashion-MNIST (IDX files, e.g. Debian's ``dataset-fashion-mnist``) into an ImageNet-style folder.

    python -m dataprep.fashion_mnist --out data/fmnist --per-class 500 --size 32

writes ``OUT/train/<class>/<n>.png`` and ``OUT/val/<class>/<n>.png`` (RGB, upscaled from 28x28), so every tool
that reads ImageNet layout reads it unchanged. Class folders are prefixed with their index so that the sorted
order (which defines labels everywhere) is the dataset's own label order.
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from shared import atomic

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array: magic 0x00 0x00 dtype ndim, then big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def class_dir(label: int) -> str:
    return f"{label:02d}_{CLASSES[label]}"


def convert(root: Path, out: Path, per_class: dict, size: int) -> dict:
    counts = {}
    for split, (img_file, lbl_file) in FILES.items():
        images, labels = read_idx(root / img_file), read_idx(root / lbl_file)
        n_split = per_class[split]
        counts[split] = 0
        for label in range(len(CLASSES)):
            d = out / split / class_dir(label)
            d.mkdir(parents=True, exist_ok=True)
            for n, i in enumerate(np.flatnonzero(labels == label)[:n_split]):
                path = d / f"{i:05d}.png"
                if path.exists():
                    counts[split] += 1
                    continue
                img = Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BICUBIC)
                with atomic.atomic_path(path) as tmp:
                    img.save(tmp, format="PNG")
                counts[split] += 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder with the four IDX .gz files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=500, help="training images per class (of 6000)")
    ap.add_argument("--val-per-class", type=int, default=50, help="validation images per class (of 1000)")
    ap.add_argument("--size", type=int, default=32, help="output side in pixels")
    a = ap.parse_args(argv)
    missing = [f for pair in FILES.values() for f in pair if not (a.root / f).is_file()]
    if missing:
        raise SystemExit(f"error: Fashion-MNIST not found under {a.root} (missing {missing[0]}); "
                         "install it with 'apt-get install dataset-fashion-mnist' or pass --root")
    counts = convert(a.root, a.out, {"train": a.per_class, "val": a.val_per_class}, a.size)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
