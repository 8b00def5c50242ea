"""Writing a token dataset: MDS chunks and their merged index, Lance appends, and ``write_dataset`` (a whole
dataset from arrays in memory, through the same writers as dataprep's job). Writers import this module
explicitly; readers never need it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from shared import atomic
from shared.token_dataset.checksums import chunk_record, commits_block
from shared.token_dataset.layout import (LANCE_COLUMNS, LANCE_FORMAT, MANIFEST, MDS_COLUMNS, MDS_COMPRESSION, MDS_DIR,
                                         MDS_HASH, MDS_SHARD_BYTES, PROVENANCE_KEY, PathOrUri, chunk_dir_name,
                                         lance_uri, mds_split_dir, row_id)
from shared.token_dataset.manifest import Manifest, SplitCounts, write_manifest
from shared.token_dataset.packing import Packing, mds_samples

_ZSTD = {"lance-encoding:compression": "zstd"}
# Level 19 on the small string columns: id 3.9 -> 2.7 and path 6.1 -> 5.0 B/row (sorted ImageNet-like
# listing) for a few seconds of CPU per million rows; it matters, the per-row budget above 576 B is 12.8 B.
_ZSTD_STRINGS = {"lance-encoding:compression": "zstd", "lance-encoding:compression-level": "19"}
_ZSTD_TOKENS = {"lance-encoding:compression": "zstd", "lance-encoding:structural-encoding": "miniblock"}
_LANCE_ENCODING = {"id": _ZSTD_STRINGS, "split": _ZSTD_STRINGS, "path": _ZSTD_STRINGS, "label": _ZSTD,
                   "view": None, "tokens": _ZSTD_TOKENS}


# --- MDS --------------------------------------------------------------------------------------------------

def write_mds_chunk(root: PathOrUri, split: str, chunk: int, rows: Sequence[Mapping[str, Any]], num_views: int,
                    shard_bytes: int = MDS_SHARD_BYTES) -> Path:
    """Write (image, view) rows {id, label, view, tokens: packed bytes} as zstd shards of one sample per
    image (``mds_samples``) into mds/<split>/chunk-NNNNN.

    Written under a temporary name and renamed, so a chunk directory is either complete or absent. Each
    shard's MDS_HASH is recorded in the chunk's index.json.
    """
    from streaming import MDSWriter

    samples = mds_samples(rows, num_views)
    final = mds_split_dir(root, split) / chunk_dir_name(chunk)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with MDSWriter(out=str(tmp), columns=MDS_COLUMNS, compression=MDS_COMPRESSION, size_limit=shard_bytes,
                   hashes=[MDS_HASH], exist_ok=True) as w:
        for sample in samples:
            w.write(sample)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def merge_mds(root: PathOrUri, split: str, chunks: Sequence[int]) -> str:
    """Write mds/<split>/index.json over the given chunk directories, in chunk order; returns its sha256.

    The same merge as Streaming's ``merge_index`` (the shards of every chunk index, their file names
    prefixed with the chunk directory), written atomically: readers see the old index or the new one.
    """
    shards = [shard for c in sorted(chunks) for shard in chunk_shards(root, split, c)]
    data = json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode()
    atomic.write_bytes(mds_split_dir(root, split) / "index.json", data)
    return hashlib.sha256(data).hexdigest()


def chunk_shards(root: PathOrUri, split: str, chunk: int) -> List[Dict[str, Any]]:
    """The shard entries of a chunk's own index.json, file names relative to mds/<split>/ (as merged)."""
    name = chunk_dir_name(chunk)
    shards = json.loads((mds_split_dir(root, split) / name / "index.json").read_text())["shards"]
    for shard in shards:
        for key in ("raw_data", "zip_data"):
            if shard.get(key):
                shard[key] = {**shard[key], "basename": f"{name}/{shard[key]['basename']}"}
    return shards


# --- Lance ------------------------------------------------------------------------------------------------

def lance_schema(packing: Packing, provenance: Mapping[str, Any]):
    """One row per (image, view); the producer's settings as JSON in the schema metadata."""
    import pyarrow as pa

    types = {"string": pa.string(), "int32": pa.int32(), "int8": pa.int8(),
             "fixed_size_binary": pa.binary(packing.bytes_per_image)}
    fields = [pa.field(name, types[t], nullable=False, metadata=_LANCE_ENCODING[name])
              for name, t in LANCE_COLUMNS.items()]
    return pa.schema(fields, metadata={PROVENANCE_KEY: json.dumps(dict(provenance), sort_keys=True)})


def lance_table(rows: Sequence[Mapping[str, Any]], schema):
    """Rows {id, split, path, label, view, tokens} as a table of ``schema`` (extra keys ignored)."""
    import pyarrow as pa

    return pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in schema}, schema=schema)


def append_lance(root: PathOrUri, table) -> int:
    """Append (or create) the Lance table; returns the new version."""
    import lance

    uri = lance_uri(root)
    mode = "append" if Path(uri, "_versions").is_dir() else "create"
    return lance.write_dataset(table, uri, mode=mode, data_storage_version=LANCE_FORMAT).version


# --- a whole dataset --------------------------------------------------------------------------------------

def write_dataset(root: PathOrUri, splits: Mapping[str, Tuple[Any, Sequence[int]]], *, grid: Sequence[int],
                  classes: Sequence[str], resolution: int, tokenizer: Mapping[str, Any],
                  subtoken_bits: Optional[Sequence[int]] = None, views: Sequence[str] = ("center",),
                  images_per_chunk: Optional[int] = None, shard_bytes: int = MDS_SHARD_BYTES) -> Manifest:
    """A complete dataset (Lance, MDS, manifest) from token arrays already in memory, through the same
    chunk writers and manifest as dataprep's job: for synthetic datasets and CPU experiments.

    ``splits``: {name: (tokens, labels)}, tokens (N, T) raster-order indices for one view or (N, V, T) for
    V = len(views); labels (N,). Row ids, paths and counts follow dataprep's conventions. ``subtoken_bits``
    (default: shared.tokens.DEFAULT_SPLIT) also gives the token width, their sum.
    """
    if subtoken_bits is None:
        from shared.tokens import DEFAULT_SPLIT as subtoken_bits
    root = Path(root)
    if (root / MANIFEST).exists() or Path(lance_uri(root)).exists() or (root / MDS_DIR).exists():
        raise ValueError(f"{root} already holds a token dataset")
    arrays: Dict[str, Tuple[np.ndarray, List[int]]] = {}
    counts: Dict[str, SplitCounts] = {}
    for name, (tokens, labels) in splits.items():
        tok = np.asarray(tokens)
        tok = tok[:, None] if tok.ndim == 2 else tok
        labs = [int(x) for x in labels]
        if tok.ndim != 3 or tok.shape[0] < 1 or tok.shape[1] != len(views) or len(labs) != tok.shape[0]:
            raise ValueError(f"split {name!r}: tokens {np.shape(tokens)} and {len(labs)} labels do not give "
                             f"(N, T) or (N, {len(views)}, T) with N >= 1 labels")
        per_class: Dict[str, int] = {}
        for lab in labs:
            per_class[str(lab)] = per_class.get(str(lab), 0) + 1
        n = tok.shape[0]
        counts[name] = SplitCounts(images=n, encoded_images=n, failed_images=0, rows=n * len(views),
                                   per_class=per_class, complete=True)
        arrays[name] = tok, labs
    manifest = Manifest(grid=tuple(int(g) for g in grid), bits_per_token=int(sum(subtoken_bits)),
                        subtoken_bits=tuple(int(b) for b in subtoken_bits), classes=tuple(classes),
                        resolution=int(resolution), views=tuple(views), tokenizer=dict(tokenizer),
                        counts=counts)  # validated before anything is written
    packing = manifest.packing
    schema = lance_schema(packing, manifest.settings())
    version, committed = None, {}
    for name, (tok, labs) in arrays.items():
        step = images_per_chunk or len(labs)
        chunks = list(range(-(-len(labs) // step)))
        records = []
        for c in chunks:
            first, stop = c * step, min((c + 1) * step, len(labs))
            part = [{"id": row_id(name, i, v), "split": name, "path": f"synthetic/{name}/{i:08d}", "label": labs[i],
                     "view": v, "tokens": packing.encode(tok[i, v])}
                    for i in range(first, stop) for v in range(len(views))]
            mds = write_mds_chunk(root, name, c, part, len(views), shard_bytes)
            version = append_lance(root, lance_table(part, schema))
            records.append(chunk_record(c, first, stop - first, part, mds))
        committed[name] = {"mds_index_sha256": merge_mds(root, name, chunks), "chunks": records}
    manifest = dataclasses.replace(manifest, commits=commits_block(root, version, committed))
    write_manifest(root, manifest)
    return manifest
