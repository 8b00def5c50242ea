"""Repack an image set into any source ``dataprep/encode.py`` reads: a class-folder tree, Parquet shards (the
layout of Hugging Face's imagenet-1k) or WebDataset tars (the layout of timm's imagenet-1k-wds).

    # the ImageNet validation set: a flat folder and a labels file
    python -m dataprep.repack --images /data/ILSVRC2012_img_val --labels LOC_val_solution.csv --split val \\
        --to parquet --out /data/imagenet-val-parquet
    # a class-folder tree, re-cut into tars of 1,250 images
    python -m dataprep.repack --folder /data/imagenet --split train --to webdataset --shard-size 1250 --out OUT

Input, one of:
  --folder ROOT --split S    ROOT/S/<class>/<image>, as ``encode.py --data ROOT`` reads it;
  --images DIR --labels FILE a flat folder of images and one ``IMAGE LABEL`` line per image (separated by a
                             comma, tab or spaces; IMAGE with or without its extension; LABEL a class name, e.g. a
                             WordNet id, or an integer). Kaggle's ``LOC_val_solution.csv`` (``ImageId,
                             PredictionString``: the first word of the prediction string is the class) reads as is.
                             Classes: --classes FILE (one name per line, line i = label i), else the sorted
                             distinct names (ImageNet's WordNet ids sort as the train folders do), or 0..max for
                             integer labels.

Output (--to), written whole into a new --out (a temporary directory renamed at the end: a killed run leaves
no output that looks complete, and an existing non-empty --out is refused):
  folder      OUT/<split>/<class>/<image>
  parquet     OUT/<split>-NNNNN-of-MMMMM.parquet: ``image`` {bytes, path}, ``label`` int64, the class names in the
              ``huggingface`` schema metadata; --row-group-size rows per row group
  webdataset  OUT/<split>-NNNN.tar: ``<key>.jpg`` (or the image's own extension) and ``<key>.cls``
and OUT/classes.txt (for ``--class-names``). The image bytes are copied, never re-encoded, and the records are
in the order a folder listing of the same images has (by class, then name), so the three outputs of the same
images encode to the same ids and tokens. The last line printed is the ``encode.py`` arguments to read it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from dataprep import cli
from dataprep import listing as ls
from shared import atomic
from shared.image_files import is_image_file

FORMATS = ("folder", "parquet", "webdataset")


class RepackError(ValueError):
    """Input that cannot be repacked (one line)."""


def read_labels(path: Path) -> Dict[str, str]:
    """{image name without extension: label text} of a labels file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise RepackError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise RepackError(f"{path}: not UTF-8 text") from None
    out: Dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or (n == 1 and line.replace(" ", "").lower() == "imageid,predictionstring"):
            continue
        parts = re.split(r"[,\t ]+", line, maxsplit=1)
        if len(parts) != 2 or not parts[1].split():
            raise RepackError(f"{path}:{n}: expected 'IMAGE LABEL', got {line!r}")
        name, label = parts[0], parts[1].split()[0]
        stem = Path(name).stem if is_image_file(name) else name
        if stem in out:
            raise RepackError(f"{path}:{n}: {name} has a label already")
        out[stem] = label
    if not out:
        raise RepackError(f"{path} holds no labels")
    return out


def read_classes(path: Path) -> List[str]:
    try:
        names = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise RepackError(f"cannot read --classes {path}: {getattr(e, 'strerror', None) or e}") from None
    if not names or not all(names) or len(set(names)) != len(names):
        raise RepackError(f"--classes {path}: expected one distinct, non-empty name per line")
    return names


def flat_records(images: Path, labels: Path, classes: Optional[Path]) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """([(file, label)] in folder-listing order, class names) of a flat folder and its labels file."""
    try:
        files = sorted((p for p in images.iterdir() if p.is_file() and is_image_file(p.name)),
                       key=lambda p: os.fsencode(p.name))
    except OSError as e:
        raise RepackError(f"cannot list {images}: {e.strerror or e}") from None
    if not files:
        raise RepackError(f"{images} holds no images")
    by_stem = read_labels(labels)
    missing = [p.name for p in files if p.stem not in by_stem]
    if missing:
        raise RepackError(f"{len(missing)} images have no label in {labels} (e.g. {missing[0]})")
    given = [by_stem[p.stem] for p in files]
    numeric = all(g.lstrip("-").isdigit() for g in given)
    names = read_classes(classes) if classes else (
        [str(i) for i in range(max(int(g) for g in given) + 1)] if numeric else sorted(set(given), key=str.encode))
    index = {n: i for i, n in enumerate(names)}
    records = []
    for p, g in zip(files, given):
        label = int(g) if numeric and g not in index else index.get(g)
        if label is None or not 0 <= label < len(names):
            raise RepackError(f"{p.name}: label {g!r} is not one of the {len(names)} classes")
        records.append((p, label))
    records.sort(key=lambda r: f"{names[r[1]]}/{r[0].name}".encode())  # a folder listing's order
    return records, names


def folder_records(root: Path, split: str) -> Tuple[List[Tuple[Path, int]], List[str]]:
    try:
        lst = ls.scan_folder(root, split)
    except ls.ListingError as e:
        raise RepackError(str(e)) from None
    bad = next((it.path for it in lst.items if it.reason), None)
    if bad:
        raise RepackError(f"{bad}: {ls.NOT_UTF8}; rename it first")
    if not lst.items:
        raise RepackError(f"{root / split} holds no images")
    return [(root / it.path, it.label) for it in lst.items], lst.classes


def _member_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _keys(records: Sequence[Tuple[Path, int]]) -> List[str]:
    keys = [p.stem.replace(".", "_") for p, _ in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise RepackError(f"two images are named {dup}: WebDataset keys must be distinct")
    return keys


def _shards(n: int, size: int) -> List[Tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def write_folder(out: Path, split: str, records, names) -> str:
    for p, label in records:
        dest = out / split / names[label] / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    return f"--data {{OUT}} --split {split}"


def write_parquet(out: Path, split: str, records, names, shard_size: int, row_group_size: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": list(names), "_type": "ClassLabel"}}}}
    schema = pa.schema([("image", image_type), ("label", pa.int64())], metadata={"huggingface": json.dumps(meta)})
    cuts = _shards(len(records), shard_size)
    for i, (lo, hi) in enumerate(cuts):
        with pq.ParquetWriter(out / f"{split}-{i:05d}-of-{len(cuts):05d}.parquet", schema) as w:
            for a, b in _shards(hi - lo, row_group_size):
                part = records[lo + a:lo + b]
                w.write_table(pa.table({
                    "image": pa.array([{"bytes": p.read_bytes(), "path": p.name} for p, _ in part], image_type),
                    "label": pa.array([label for _, label in part], pa.int64())}, schema=schema))
    return f"--data '{{OUT}}/{split}-*.parquet'"


def write_webdataset(out: Path, split: str, records, names, shard_size: int) -> str:
    keys = _keys(records)
    cuts = _shards(len(records), shard_size)
    for i, (lo, hi) in enumerate(cuts):
        with tarfile.open(out / f"{split}-{i:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for (p, label), key in zip(records[lo:hi], keys[lo:hi]):
                for name, data in ((f"{key}.{_member_ext(p)}", p.read_bytes()), (f"{key}.cls", f"{label}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tf.addfile(info, io.BytesIO(data))
    exts = sorted({_member_ext(p) for p, _ in records})
    key_arg = "" if exts == ["jpg"] else f" --image-key {','.join(exts)}"
    last = len(cuts) - 1
    shards = f"{split}-0000.tar" if last == 0 else f"{split}-{{0000..{last:04d}}}.tar"
    return f"--data '{{OUT}}/{shards}'{key_arg} --class-names {{OUT}}/classes.txt"


def repack(records, names, out: Path, split: str, to: str, shard_size: int, row_group_size: int) -> str:
    """Write the records into ``out`` (atomically: the whole directory appears at the end); returns the
    ``encode.py`` arguments that read it."""
    with atomic.atomic_dir(out, what="a repacked image set") as tmp:
        (tmp / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        if to == "folder":
            args = write_folder(tmp, split, records, names)
        elif to == "parquet":
            args = write_parquet(tmp, split, records, names, shard_size, row_group_size)
        else:
            args = write_webdataset(tmp, split, records, names, shard_size)
    return args.replace("{OUT}", str(out))


def main(argv: Optional[List[str]] = None) -> int:
    p = cli.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, help="a class-folder root: ROOT/<split>/<class>/<image>")
    p.add_argument("--images", type=Path, help="a flat folder of images (with --labels)")
    p.add_argument("--labels", type=Path, help="IMAGE LABEL per line, or Kaggle's LOC_val_solution.csv")
    p.add_argument("--classes", type=Path, help="class names, one per line (line i = label i)")
    p.add_argument("--split", default="train", help="the split's name (input folder with --folder; output names)")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="a new directory")
    p.add_argument("--shard-size", type=cli.positive_int, default=1000, help="images per Parquet file or tar")
    p.add_argument("--row-group-size", type=cli.positive_int, default=100, help="Parquet rows per row group")
    a = p.parse_args(argv)
    if (a.folder is None) == (a.images is None) or (a.images is not None and a.labels is None):
        p.error("give --folder ROOT, or --images DIR with --labels FILE")
    if a.folder is not None and (a.labels or a.classes):
        p.error("--labels and --classes go with --images")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", a.split):
        p.error(f"--split {a.split!r}: letters, digits, '_', '.', '-'")
    try:
        atomic.check_output_dir(a.out, owned=lambda _: False, what="a repacked image set")
        if a.folder is not None:
            records, names = folder_records(a.folder, a.split)
        else:
            records, names = flat_records(a.images, a.labels, a.classes)
        if a.to == "webdataset":
            _keys(records)
        encode_args = repack(records, names, a.out, a.split, a.to, a.shard_size, a.row_group_size)
    except (RepackError, atomic.OutputError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: {e.filename or a.out}: {e.strerror or e}") from None
    print(f"wrote {len(records)} images of {len(names)} classes to {a.out} ({a.to})")
    print(f"encode with: python dataprep/encode.py {encode_args} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
