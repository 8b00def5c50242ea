"""The checksums a manifest's ``commits`` block records, and how they are computed (writers and the
verifier use this module; plain readers do not need it).

    {"lance_version": int | null,            the Lance version readers open (null: no row in any split)
     "lance_files": {name: sha256},          the data files (under tokens.lance/data/) of that version
     "splits": {split: {"mds_index_sha256":  sha256 of mds/<split>/index.json (null until the split is complete)
                        "chunks": [{"chunk", "first", "images", "rows", "rows_sha256", "paths_sha256",
                                    "mds_index_sha256"}]}}}

A chunk holds images [first, first + images) and ``rows`` rows. ``rows_sha256`` covers the fields both
stores hold (id, label, view, tokens), so one digest checks Lance and MDS; ``paths_sha256`` covers
Lance's path column; ``mds_index_sha256`` is the chunk's own MDS index, which carries the shards' sha1.
``check_commits`` validates the block (a ``Manifest`` does, on construction).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence

from shared.token_dataset.layout import MANIFEST, PathOrUri, check_int, check_keys, fail, lance_uri, parse_row_id

if TYPE_CHECKING:
    from shared.token_dataset.manifest import SplitCounts

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_KEYS = {"chunk", "first", "images", "rows", "rows_sha256", "paths_sha256", "mds_index_sha256"}


def sha256_file(path: PathOrUri, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(ckpt_dir: PathOrUri) -> str:
    """The tokenizer identity the manifest records: sha256 of the checkpoint's weights file."""
    return sha256_file(Path(ckpt_dir) / "model.safetensors")


def row_digest(rid: str, label: int, view: int, tokens: bytes) -> bytes:
    """sha256 of one row's fields common to both stores (tokens last: the encoding is unambiguous)."""
    return hashlib.sha256(f"{rid}\t{int(label)}\t{int(view)}\t".encode() + bytes(tokens)).digest()


def path_digest(rid: str, path: str) -> bytes:
    return hashlib.sha256(f"{rid}\t{path}".encode()).digest()


def chunk_digest(rows: Mapping[str, bytes]) -> str:
    """A chunk's digest from {row id: row or path digest}: rows taken in (index, view) order."""
    return hashlib.sha256(b"".join(d for _, d in sorted(rows.items(), key=lambda kv: parse_row_id(kv[0])[1:]))
                          ).hexdigest()


def chunk_record(chunk: int, first: int, images: int, rows: Sequence[Mapping[str, Any]],
                 mds_dir: PathOrUri) -> Dict[str, Any]:
    """The ``commits`` entry of a chunk whose ``rows`` were just written to MDS (``mds_dir``) and Lance."""
    return {"chunk": chunk, "first": first, "images": images, "rows": len(rows),
            "rows_sha256": chunk_digest({r["id"]: row_digest(r["id"], r["label"], r["view"], r["tokens"])
                                         for r in rows}),
            "paths_sha256": chunk_digest({r["id"]: path_digest(r["id"], r["path"]) for r in rows}),
            "mds_index_sha256": sha256_file(Path(mds_dir) / "index.json")}


def lance_data_files(root: PathOrUri, version: Optional[int]) -> Dict[str, str]:
    """{data file name: sha256} of the files a Lance version reads (its fragments' data files)."""
    if version is None:
        return {}
    import lance

    ds = lance.dataset(lance_uri(root), version=version)
    names = sorted(f.path for frag in ds.get_fragments() for f in frag.data_files())
    return {n: sha256_file(Path(lance_uri(root), "data", n)) for n in names}


def commits_block(root: PathOrUri, lance_version: Optional[int], splits: Mapping[str, Mapping[str, Any]],
                  lance_files: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The manifest's ``commits`` (``lance_files`` are hashed from disk unless given)."""
    files = lance_files if lance_files is not None else lance_data_files(root, lance_version)
    return {"lance_version": lance_version, "lance_files": dict(sorted(files.items())),
            "splits": {k: {"mds_index_sha256": v["mds_index_sha256"],
                           "chunks": sorted(v["chunks"], key=lambda c: c["chunk"])} for k, v in sorted(splits.items())}}


def _sha(v: Any, where: str, nullable: bool = False) -> None:
    if not ((nullable and v is None) or (isinstance(v, str) and SHA256_HEX.match(v))):
        raise fail(where, f"must be 64 hex digits{' or null' if nullable else ''}, got {v!r}")


def check_commits(commits: Any, counts: Mapping[str, "SplitCounts"], where: str = MANIFEST) -> None:
    """Validate a ``commits`` block against the counts it must add up to (ManifestError otherwise)."""
    c = check_keys(commits, {"lance_version", "lance_files", "splits"}, f"{where}: commits")
    if c["lance_version"] is not None:
        check_int(c["lance_version"], f"{where}: commits.lance_version", 1)
    elif any(cnt.rows for cnt in counts.values()):
        raise fail(where, "commits.lance_version is null, but the counts hold rows")
    if not isinstance(c["lance_files"], dict):
        raise fail(where, "commits.lance_files must be an object {file: sha256}")
    for name, digest in c["lance_files"].items():
        _sha(digest, f"{where}: commits.lance_files[{name!r}]")
    splits = c["splits"] if isinstance(c["splits"], dict) else None
    if splits is None or set(splits) != set(counts):
        raise fail(where, f"commits.splits must name the splits of counts {sorted(counts)}, got "
                          f"{sorted(splits) if splits is not None else c['splits']!r}")
    for name, rec in splits.items():
        at = f"{where}: commits.splits.{name}"
        rec = check_keys(rec, {"mds_index_sha256", "chunks"}, at)
        _sha(rec["mds_index_sha256"], f"{at}.mds_index_sha256", nullable=not counts[name].complete)
        if not isinstance(rec["chunks"], list):
            raise fail(at, "chunks must be a list")
        seen, spans = set(), []
        for ch in rec["chunks"]:
            ch = check_keys(ch, _CHUNK_KEYS, f"{at}.chunks[]")
            for k in ("chunk", "first", "images", "rows"):
                check_int(ch[k], f"{at}.chunks[].{k}", 1 if k == "images" else 0)
            for k in ("rows_sha256", "paths_sha256", "mds_index_sha256"):
                _sha(ch[k], f"{at}.chunks[{ch['chunk']}].{k}")
            if ch["chunk"] in seen:
                raise fail(at, f"chunk {ch['chunk']} is listed twice")
            seen.add(ch["chunk"])
            spans.append((ch["first"], ch["first"] + ch["images"]))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise fail(at, "chunks overlap")
        images = sum(ch["images"] for ch in rec["chunks"])
        rows = sum(ch["rows"] for ch in rec["chunks"])
        cnt = counts[name]
        if images != cnt.encoded_images + cnt.failed_images or rows != cnt.rows:
            raise fail(at, f"chunks hold {images} images and {rows} rows, counts say "
                           f"{cnt.encoded_images + cnt.failed_images} and {cnt.rows}")
