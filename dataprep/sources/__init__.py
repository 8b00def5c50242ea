"""Where ``--data``'s images come from, beside a local folder and a file list (``dataprep.listing``).

| ``--data`` | format | an image's path (its id within the source) |
|---|---|---|
| ``ROOT`` (a folder), ``s3://BUCKET/PREFIX`` | ``folder``: ``<split>/<class>/<image>`` | ``<split>/<class>/<image>`` |
| ``DIR/train-*.parquet``, ``s3://.../train-*.parquet`` | ``parquet`` (Hugging Face: ``image.bytes``, ``label``) | ``SHARD#ROW`` |
| ``DIR/imagenet1k-train-{0000..1023}.tar``, ``s3://...`` | ``webdataset`` (timm: ``<key>.jpg``, ``<key>.cls``) | ``SHARD#KEY`` |

The format is read from the path where it is unambiguous (a ``.parquet`` or ``.tar`` pattern or file, a
folder) and given with ``--format`` otherwise (a folder or prefix of shards: all its ``*.parquet`` / ``*.tar``).
Everything here runs in the driver before Ray starts, and each problem is one line: no shard matches,
a prefix with no images, a Parquet file without the image column, tars without labels, unknown classes.
The driver keeps one entry per shard, never one per image (``shards.ShardListing``); Ray tasks read the
shards (``shards.read_chunk``). Only ``shared.object_store`` talks to S3.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from dataprep import cli
from dataprep import listing as ls
from dataprep.sources import patterns
from dataprep.sources.folders import FolderListing, scan_s3_folder
from dataprep.sources.records import SourceError
from dataprep.sources.shards import ShardListing, list_source
from shared import object_store as store

FORMATS = ("folder", "parquet", "webdataset")
SUFFIX = {".parquet": "parquet", ".tar": "webdataset"}
_OPTION_FORMATS = {"image_column": ("parquet",), "label_column": ("parquet",), "image_key": ("webdataset",),
                   "label_key": ("webdataset",), "class_names": ("parquet", "webdataset"),
                   "num_classes": ("parquet", "webdataset")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS,
                   help="what --data holds: folder (<split>/<class>/<image>), parquet or webdataset shards; "
                        "default: read from --data (a folder, *.parquet, *.tar)")
    p.add_argument("--image-column", help="parquet: the image column, a struct with 'bytes' or binary (default image)")
    p.add_argument("--label-column", help="parquet: the integer label column (default label)")
    p.add_argument("--image-key", help="webdataset: the image member's extension, or several comma-separated "
                                       "(default jpg)")
    p.add_argument("--label-key", help="webdataset: the label member's extension, decimal text (default cls)")
    p.add_argument("--class-names", metavar="FILE",
                   help="parquet / webdataset: class names, one per line (line i = label i); default: the Parquet "
                        "files' Hugging Face metadata")
    p.add_argument("--num-classes", type=cli.positive_int,
                   help="parquet / webdataset: number of classes when no names are known (classes '0'..'N-1')")


def _suffix_format(path: str) -> Optional[str]:
    return next((fmt for suf, fmt in SUFFIX.items() if path.lower().endswith(suf)), None)


def detect(args) -> Optional[str]:
    """'s3-folder', 'parquet' or 'webdataset'; None for what ``dataprep.listing`` reads (a local folder, a
    file list). A contradiction between --data, --format and the format options is one line."""
    data, fmt = args.data, args.format
    given = [k for k in _OPTION_FORMATS if getattr(args, k, None) is not None]
    if args.file_list:
        if fmt or given or (data and store.is_s3(data)):
            raise SystemExit("error: --file-list lists local image files: it takes no --format, format options or "
                             "s3:// --data")
        return None
    if not data:
        return None
    special = patterns.has_special(data)
    guessed = _suffix_format(data)
    if guessed is None and not special and not store.is_s3(data) and os.path.isfile(data):
        raise SystemExit(f"error: --data {data} is a file that is neither .parquet nor .tar: give a folder, shards "
                         "(*.parquet, *.tar) or --file-list")
    if fmt is None:
        if guessed is None and special:
            raise SystemExit(f"error: cannot tell the format of --data {data}: give --format parquet or webdataset")
        fmt = guessed or "folder"
    elif guessed is not None and guessed != fmt:
        raise SystemExit(f"error: --data {data} names {guessed} files, not --format {fmt}")
    elif fmt == "folder" and special:
        raise SystemExit(f"error: --format folder takes a folder, not a pattern: {data}")
    wrong = [k for k in given if fmt not in _OPTION_FORMATS[k]]
    if wrong:
        opt = "--" + wrong[0].replace("_", "-")
        raise SystemExit(f"error: {opt} goes with --format {' or '.join(_OPTION_FORMATS[wrong[0]])}, not {fmt}")
    if fmt == "folder":
        return "s3-folder" if store.is_s3(data) else None
    return fmt


def pattern_of(data: str, fmt: str) -> str:
    """--data as a shard pattern: a folder or prefix of shards means all its *.parquet / *.tar."""
    if patterns.has_special(data) or _suffix_format(data):
        return data
    return data.rstrip("/") + "/*" + next(s for s, f in SUFFIX.items() if f == fmt)


def read_class_names(path: str) -> Tuple[str, List[str]]:
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise SourceError(f"--class-names: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SourceError(f"--class-names {path}: not UTF-8 text") from None
    names = text.splitlines()
    for n, name in enumerate(names, 1):
        if not name.strip():
            raise SourceError(f"--class-names {path}:{n}: an empty class name")
    if not names:
        raise SourceError(f"--class-names {path} names no class")
    return path, [n.strip() for n in names]


def read_listing(args, log: Callable[[str], None], prior: Optional[Dict[str, Any]] = None):
    """(data root or None, listing) of a source ``detect`` names, or a one-line exit. ``prior``: the source
    this split recorded in an earlier run (its shard counts are reused where the shards did not change)."""
    kind = detect(args)
    try:
        if store.is_s3(args.data):
            store.configure(getattr(args, "s3_endpoint_url", None))
        if kind == "s3-folder":
            return args.data.rstrip("/"), scan_s3_folder(args.data, args.split)
        options = {"image_column": args.image_column, "label_column": args.label_column,
                   "image_keys": [k.strip().lstrip(".") for k in args.image_key.split(",")] if args.image_key else None,
                   "label_key": args.label_key.lstrip(".") if args.label_key else None}
        names = read_class_names(args.class_names) if args.class_names else None
        listing = list_source(kind, pattern_of(args.data, kind), options, names_option=names,
                              num_classes=args.num_classes, prior=prior, log=log)
        return None, listing
    except (patterns.PatternError, SourceError, ls.ListingError, store.StoreError) as e:
        raise SystemExit(f"error: {cli.first_line(e, limit=500)}") from None


def record(args, data, listing) -> Dict[str, Any]:
    """The source as the manifest records it for the split (``sources.<split>``)."""
    if isinstance(listing, ShardListing):
        return listing.record()
    if isinstance(listing, FolderListing):
        return dict(listing.source)
    if args.file_list:
        return {"uri": str(Path(args.file_list).resolve()), "format": "file-list"}
    return {"uri": str(data), "format": "folder"}


def kind(args, listing) -> str:
    """The run setting ``source``: folder, file-list, parquet or webdataset."""
    if isinstance(listing, ShardListing):
        return listing.fmt
    return "file-list" if args.file_list else "folder"


def check_unchanged(prior: Optional[Dict[str, Any]], current: Dict[str, Any], split: str) -> None:
    """Refuse, in one line, to go on with a split whose source is not the one it was started from (shards
    added, removed, resized or rewritten; other objects under an S3 folder; other columns or keys)."""
    if not prior:
        return
    what = None
    keys = sorted((set(prior) | set(current)) - {"uri", "shards", "records", "objects", "objects_sha256",
                                                  "classes_from"})  # the classes themselves: the settings
    diffs = [f"{k} {prior.get(k)!r} -> {current.get(k)!r}" for k in keys if prior.get(k) != current.get(k)]
    if diffs:
        what = "; ".join(diffs)
    elif "shards" in prior or "shards" in current:
        what = patterns.changed(prior.get("shards", []), [_shard(d) for d in current.get("shards", [])])
    elif prior.get("objects_sha256") != current.get("objects_sha256"):
        what = (f"the images under it changed ({prior.get('objects')} -> {current.get('objects')} images, or their "
                "sizes or ETags)")
    if what:
        raise SystemExit(f"error: the source of split {split!r} ({store.redact(prior.get('uri', ''))}) changed "
                         f"since it was started: {what}; use a new --out directory")


def _shard(d: Dict[str, Any]) -> patterns.Shard:
    return patterns.Shard(d["name"], "", d["size"], d.get("etag", ""), d.get("mtime_ns", 0))


def recorded(root: Path, split: str) -> Optional[Dict[str, Any]]:
    """The source an earlier run of ``split`` recorded in ``root``'s state, if any (read without the lock:
    only to skip re-reading shards; the job compares again under the lock)."""
    from dataprep import state as st

    try:
        state = st.State.load(root)
    except (st.ProvenanceError, OSError):
        return None
    rec = state.split(split) if state is not None else None
    return rec.get("source") if isinstance(rec, dict) else None


def work_rows(listing, split: str, chunks: Sequence[Tuple[int, int]], todo: Sequence[int],
              batch_size: int) -> List[Dict[str, Any]]:
    """The Ray rows of the chunks to encode: groups of image paths, or (shards) one row per chunk."""
    if isinstance(listing, ShardListing):
        return listing.work_rows(split, chunks, todo, batch_size)
    from dataprep import pipeline

    rows: List[Dict[str, Any]] = []
    for c in todo:
        lo, hi = chunks[c]
        rows += pipeline.group_rows(split, c, ls.groups(listing.items[lo:hi], batch_size))
    return rows


def read_stage(listing) -> Optional[Dict[str, Any]]:
    """``read_chunk``'s arguments when the listing's chunks are read from shards (``pipeline.build``)."""
    return listing.read_kwargs() if isinstance(listing, ShardListing) else None
