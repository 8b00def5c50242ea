"""Writers for the two stores: a versioned Lance table and MosaicML Streaming (MDS) shards.

Both are written chunk by chunk. A chunk's MDS shards go to their own sub-directory
``mds/<split>/chunk-NNNNN`` (renamed into place when complete), its rows are one Lance append (one new
version); ``merge_index`` joins the committed sub-directories into ``mds/<split>/index.json``.

Sizes per row (measured with pylance 14 / streaming 0.13, 20k rows of 256 uniformly random 18-bit
tokens, sorted ImageNet-like paths): tokens as fixed_size_binary(576) with zstd in the mini-block layout
577.3 B, id 2.7 B, path 5.0 B, label + view + split 0.4 B: 585 B = 2.29 B/token. A variable-size binary
column would add 8 B/row of offsets (2.0 format) or skip compression (2.1 full-zip layout), hence the
fixed size.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pyarrow as pa

LANCE_DIR = "tokens.lance"
MDS_DIR = "mds"
MDS_COLUMNS = {"id": "str", "label": "int", "view": "int", "tokens": "bytes"}
# Small records (~600 B) shuffle well only when shards are small: Streaming shuffles shard by shard,
# so 4 MiB shards (~7k records) give a 2.5M-row ImageNet dataset several hundred shards to mix.
MDS_SHARD_BYTES = 1 << 22
LANCE_FORMAT = "2.1"
_ZSTD = {"lance-encoding:compression": "zstd"}
# Level 19 on the small string columns: id 3.9 -> 2.7 and path 6.1 -> 5.0 B/row (sorted ImageNet-like
# listing) for a few seconds of CPU per million rows; it matters, the per-row budget above 576 B is 12.8 B.
_ZSTD_STRINGS = {"lance-encoding:compression": "zstd", "lance-encoding:compression-level": "19"}
_ZSTD_TOKENS = {"lance-encoding:compression": "zstd", "lance-encoding:structural-encoding": "miniblock"}


def lance_schema(token_nbytes: int, provenance: Dict[str, Any]) -> pa.Schema:
    """One row per (image, view); provenance JSON in the schema metadata."""
    fields = [
        pa.field("id", pa.string(), nullable=False, metadata=_ZSTD_STRINGS),
        pa.field("split", pa.string(), nullable=False, metadata=_ZSTD_STRINGS),
        pa.field("path", pa.string(), nullable=False, metadata=_ZSTD_STRINGS),
        pa.field("label", pa.int32(), nullable=False, metadata=_ZSTD),
        pa.field("view", pa.int8(), nullable=False),
        pa.field("tokens", pa.binary(token_nbytes), nullable=False, metadata=_ZSTD_TOKENS),
    ]
    return pa.schema(fields, metadata={"open-magvit2": json.dumps(provenance, sort_keys=True)})


def rows_table(rows: Sequence[Dict[str, Any]], schema: pa.Schema) -> pa.Table:
    cols = {f.name: [r[f.name] for r in rows] for f in schema}
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


class LanceStore:
    """Append-per-chunk Lance table with rollback to the last recorded version."""

    def __init__(self, root: Path):
        self.uri = str(Path(root) / LANCE_DIR)

    def exists(self) -> bool:
        return Path(self.uri, "_versions").is_dir()

    def dataset(self, version: Optional[int] = None):
        import lance

        return lance.dataset(self.uri, version=version)

    def append(self, table: pa.Table) -> int:
        import lance

        mode = "append" if self.exists() else "create"
        ds = lance.write_dataset(table, self.uri, mode=mode, data_storage_version=LANCE_FORMAT)
        return ds.version

    def rollback(self, version: Optional[int]) -> bool:
        """Make ``version`` the latest again (None: no committed rows, remove the table). True if changed."""
        if version is None:
            if Path(self.uri).exists():
                shutil.rmtree(self.uri)
                return True
            return False
        latest = self.dataset().version
        if latest == version:
            return False
        if latest < version:
            raise RuntimeError(f"{self.uri} is at version {latest}, older than the recorded {version}")
        self.dataset(version).restore()
        return True

    def compact(self) -> int:
        """Merge the per-chunk fragments into large files; returns the new version."""
        ds = self.dataset()
        if len(ds.get_fragments()) > 1:
            ds.optimize.compact_files(target_rows_per_fragment=1 << 20)
        return self.dataset().version

    def cleanup(self) -> None:
        """Drop old versions and unreferenced files (debris of interrupted appends) to save disk."""
        self.dataset().cleanup_old_versions(older_than=timedelta(seconds=0), delete_unverified=True)


def mds_split_dir(root: Path, split: str) -> Path:
    return Path(root) / MDS_DIR / split


def chunk_dir_name(chunk: int) -> str:
    return f"chunk-{chunk:05d}"


def write_mds_chunk(root: Path, split: str, chunk: int, rows: Sequence[Dict[str, Any]]) -> Path:
    """Write one chunk's rows as zstd MDS shards into mds/<split>/chunk-NNNNN (atomically renamed)."""
    from streaming import MDSWriter

    final = mds_split_dir(root, split) / chunk_dir_name(chunk)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with MDSWriter(out=str(tmp), columns=MDS_COLUMNS, compression="zstd", size_limit=MDS_SHARD_BYTES,
                   exist_ok=True) as w:
        for r in rows:
            w.write({"id": r["id"], "label": int(r["label"]), "view": int(r["view"]), "tokens": r["tokens"]})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def remove_stray_mds(root: Path, split: str, committed: Sequence[int]) -> List[str]:
    """Delete chunk directories (and temp dirs) that the state does not list as committed."""
    base = mds_split_dir(root, split)
    keep = {chunk_dir_name(c) for c in committed}
    removed = []
    if base.is_dir():
        for p in base.iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p)
                removed.append(p.name)
    return removed


def merge_mds(root: Path, split: str, committed: Sequence[int]) -> Path:
    """Write mds/<split>/index.json over the committed chunk directories, in chunk order."""
    from streaming.base.util import merge_index

    base = mds_split_dir(root, split)
    files = [str(base / chunk_dir_name(c) / "index.json") for c in sorted(committed)]
    index = base / "index.json"
    index.unlink(missing_ok=True)  # merge_index moves its result in place and refuses to overwrite
    if files:
        merge_index(files, str(base), keep_local=True)
    return index


def store_bytes(path: Path) -> int:
    """Bytes on disk of every file under ``path`` (the whole store, metadata included)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
