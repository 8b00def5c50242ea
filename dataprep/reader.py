"""Read a token dataset: the manifest, the Lance table and the MDS shards, tokens as 18-bit indices or
(6, 12)-bit sub-tokens, all as ``shared.token_dataset`` defines them.

    ds = TokenDataset("data/imagenet-tokens")    # or "s3://bucket/imagenet-tokens" (see shared.object_store)
    rows = ds.read_lance(split="train")          # dict: id, label, view, path, tokens (N, h, w) int64
    pre, post = ds.subtokens(rows["tokens"])      # (N, h, w) each: index & 63, index >> 6
    stream = ds.streaming("train", local="cache/train", batch_size=64, shuffle=True)  # StreamingDataset

Lance is not fork-safe: open it inside each DataLoader worker (``TokenDataset`` opens lazily).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from dataprep import stores
from shared import object_store
from shared import token_dataset as td
from shared.tokens import split_index


class TokenDataset:
    """A finished dataset, in a local directory or on object storage (``s3://bucket/prefix``); the manifest
    is validated on opening (``ManifestError`` otherwise)."""

    def __init__(self, root: str | Path):
        self.remote = td.is_remote(root)
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        if object_store.is_s3(root):
            object_store.configure()  # hands the environment's endpoint to Streaming too
        self.manifest: td.Manifest = td.read_manifest(self.root)
        self.grid: Tuple[int, int] = self.manifest.grid
        self.bits: int = self.manifest.bits_per_token
        self.split_bits: Tuple[int, ...] = self.manifest.subtoken_bits
        self.packing = self.manifest.packing
        self._lance = None

    @property
    def tokens_per_image(self) -> int:
        return self.manifest.tokens_per_image

    @property
    def splits(self) -> List[str]:
        return self.manifest.splits

    # --- codec ---------------------------------------------------------------------------------------
    def unpack(self, packed: Sequence[bytes]) -> np.ndarray:
        """Packed rows -> (N, h, w) int64 indices."""
        out = np.empty((len(packed), self.tokens_per_image), dtype=np.int64)
        for i, b in enumerate(packed):
            out[i] = self.packing.decode(b)
        return out.reshape(len(packed), *self.grid)

    def subtokens(self, indices: np.ndarray) -> Tuple[np.ndarray, ...]:
        return split_index(indices, self.split_bits)

    # --- Lance ---------------------------------------------------------------------------------------
    def lance(self):
        """The Lance dataset at the manifest's committed version (rows appended since, by a split being
        encoded or a killed job, are not the dataset's), opened on first use; its columns must be the ones
        the manifest names."""
        if self._lance is None:
            try:
                ds = td.open_lance(self.root, self.manifest.lance_version)
            except (OSError, ValueError) as e:  # Lance's errors carry Rust source locations on later lines
                raise td.ManifestError(f"cannot open {td.lance_uri(self.root)} at version "
                                       f"{self.manifest.lance_version}: {str(e).splitlines()[0][:400]}") from None
            have = {f.name: str(f.type) for f in ds.schema}
            want = td.stores(self.packing)["lance"]["columns"]
            if have != want:
                raise td.ManifestError(f"{td.lance_uri(self.root)} has columns {have}, the manifest says {want}")
            self._lance = ds
        return self._lance

    def provenance(self) -> Dict[str, Any]:
        """The settings stored in the Lance schema metadata."""
        meta = self.lance().schema.metadata or {}
        return json.loads(meta[td.PROVENANCE_KEY.encode()])

    def read_lance(self, split: Optional[str] = None, filter: Optional[str] = None,
                   columns: Sequence[str] = ("id", "path", "label", "view", "tokens")) -> Dict[str, Any]:
        """Rows (optionally of one split and/or a Lance SQL filter), sorted by id; tokens unpacked."""
        conds = [f"split = '{split}'"] if split else []
        if filter:
            conds.append(f"({filter})")
        cols = list(dict.fromkeys(["id", *columns]))
        table = self.lance().to_table(columns=cols, filter=" AND ".join(conds) or None).sort_by("id")
        out: Dict[str, Any] = {c: table[c].to_pylist() for c in cols if c != "tokens"}
        if "tokens" in cols:
            out["tokens"] = self.unpack(table["tokens"].to_pylist())
        return out

    def take(self, ids: Iterable[str]) -> Dict[str, Any]:
        quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
        return self.read_lance(filter=f"id IN ({quoted})")

    # --- MDS -----------------------------------------------------------------------------------------
    def mds_dir(self, split: str) -> str:
        return td.dataset_uri(self.root, td.MDS_DIR, split)

    def streaming(self, split: str, local: str | Path, **kwargs):
        """A StreamingDataset over the split's shards (``local``: a cache directory of its own, since
        compressed shards get decompressed copies). A sample is an image: ``id``, ``label`` and ``tokens``
        (V, h, w) int64, its views in the manifest's ``views`` order."""
        from streaming import StreamingDataset

        grid, packing, views = self.grid, self.packing, len(self.manifest.views)

        class _Tokens(StreamingDataset):
            def get_item(self, idx: int, retry: int = 7, *, raw: bool = False) -> Dict[str, Any]:
                s = super().get_item(idx, retry)
                if not raw:
                    s["tokens"] = packing.decode_views(s["tokens"], views).reshape(views, *grid)
                return s

        return _Tokens(remote=self.mds_dir(split), local=str(local), **kwargs)

    def read_mds(self, split: str, local: str | Path) -> Dict[str, Any]:
        """Every (image, view) row of a split's MDS samples, in storage order, as the columns ``read_lance``
        gives (tests and inspection)."""
        td.clean_stale_streaming_shm()
        ds = self.streaming(split, local, shuffle=False, batch_size=1)
        rows = [r for i in range(ds.num_samples)
                for r in td.mds_rows(ds.get_item(i, raw=True), self.packing.bytes_per_image)]
        return {"id": [r[0] for r in rows], "label": [r[1] for r in rows], "view": [r[2] for r in rows],
                "tokens": self.unpack([r[3] for r in rows]) if rows else np.zeros((0, *self.grid), np.int64)}

    # --- sizes ---------------------------------------------------------------------------------------
    def bytes_per_token(self) -> Dict[str, Dict[str, float]]:
        """On-disk bytes / stored tokens for each store, everything under the store counted."""
        rows = sum(c.rows for c in self.manifest.counts.values())
        tokens = rows * self.tokens_per_image
        out = {}
        for name, sub in (("lance", td.LANCE_DIR), ("mds", td.MDS_DIR)):
            size = stores.store_bytes(td.dataset_uri(self.root, sub))
            out[name] = {"bytes": size, "tokens": tokens, "bytes_per_token": size / tokens if tokens else float("nan")}
        return out
