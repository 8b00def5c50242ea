"""Shard files for the source tests: a folder of real photo crops repacked into Parquet files and WebDataset
tars (``dataprep.repack``), and shards holding one bad record of each kind a real source has."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Tuple

from dataprep import repack
from dataprep.sample_images import image_folder

SHARD, ROW_GROUP = 5, 2


def source_folder(root: Path) -> Path:
    """ROOT/train/class_0{0,1,2}/: 12 photo crops, and a truncated JPEG listed last (13 images)."""
    image_folder(root, classes=3, per_class=4)
    good = sorted((root / "train" / "class_02").iterdir())[0].read_bytes()
    (root / "train" / "class_02" / "zz_broken.jpg").write_bytes(good[: len(good) // 3])
    return root


def tar_bytes(members: Iterable[Tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(rows, image_column: str = "image", label_type=None) -> bytes:
    """A Parquet file of (image bytes or None, label or None) rows, Hugging Face's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({image_column: pa.array([{"bytes": b, "path": "x.jpg"} for b, _ in rows], image_type),
                      "label": pa.array([lbl for _, lbl in rows], label_type or pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def bad_shards(good_jpeg: bytes) -> Dict[str, Dict[str, bytes]]:
    """{format: {file name: bytes}}: shards to append after the repacked ones (their names sort last), with
    a record of each bad kind. Parquet: a missing label, a label out of range (3 classes), null image
    bytes, then a truncated file. WebDataset: a sample without its label, one out of range, a good one, a
    damaged header (the rest of that tar is lost); a file that is not a tar; a tar cut inside its last image."""
    full = parquet_bytes([(good_jpeg, 0)])
    damaged = bytearray(tar_bytes([("a.jpg", good_jpeg), ("b.jpg", good_jpeg), ("b.cls", b"9"), ("c.jpg", good_jpeg),
                                   ("c.cls", b"1"), ("d.jpg", good_jpeg), ("d.cls", b"2")]))
    at = damaged.index(b"d.jpg")  # the start of d.jpg's header block
    damaged[at:at + 512] = b"\x7f" * 512
    cut = tar_bytes([("e.jpg", good_jpeg), ("e.cls", b"0"), ("f.cls", b"1"), ("f.jpg", good_jpeg)])
    return {
        "parquet": {"train-zz-bad-labels.parquet": parquet_bytes([(good_jpeg, None), (good_jpeg, 7), (None, 1)]),
                    "train-zz-truncated.parquet": full[: len(full) // 2]},
        "webdataset": {"train-0003.tar": bytes(damaged), "train-0004.tar": b"this is not a tar file\n" * 50,
                       "train-0005.tar": cut[: cut.index(good_jpeg[-200:], cut.index(b"f.jpg"))]},
    }


def upload_sources(base: str, dirs: Dict[str, Path]) -> None:
    """Every file under ``dirs[fmt]`` to ``base/fmt/`` (the S3 copy of each source, the same names)."""
    from shared import object_store

    for fmt, where in dirs.items():
        for p in sorted(Path(where).rglob("*")):
            if p.is_file():
                object_store.upload_file(str(p), f"{base}/{fmt}/{p.relative_to(where).as_posix()}")


def shard_sources(folder: Path, out: Path) -> Dict[str, str]:
    """The folder repacked into Parquet files and tars under ``out`` plus the bad shards; {format: pattern}."""
    good = sorted((folder / "train" / "class_00").iterdir())[0].read_bytes()
    extra = bad_shards(good)
    for fmt in ("parquet", "webdataset"):
        repack.main(["--folder", str(folder), "--split", "train", "--to", fmt, "--out", str(out / fmt),
                     "--shard-size", str(SHARD), "--row-group-size", str(ROW_GROUP)])
        for name, data in extra[fmt].items():
            (out / fmt / name).write_bytes(data)
    return {"parquet": str(out / "parquet" / "train-*.parquet"),
            "webdataset": str(out / "webdataset" / "train-{0000..0005}.tar")}
