"""Read a token dataset: the manifest, the Lance table and the MDS shards, tokens as 18-bit indices or
(6, 12)-bit sub-tokens through the shared codec.

    ds = TokenDataset("data/imagenet-tokens")
    rows = ds.read_lance(split="train")          # dict: id, label, view, path, tokens (N, h, w) int64
    pre, post = ds.subtokens(rows["tokens"])      # (N, h, w) each: index & 63, index >> 6
    stream = ds.streaming("train", local="cache/train", batch_size=64, shuffle=True)  # for Stage 2

Lance is not fork-safe: open it inside each DataLoader worker (``TokenDataset`` opens lazily).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from dataprep import state as st
from dataprep import writers as wr
from shared.tokens import split_index, unpack_tokens


class TokenDataset:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        f = self.root / st.MANIFEST
        if not f.is_file():
            raise FileNotFoundError(f"{self.root} has no {st.MANIFEST}: not a finished token dataset")
        self.manifest: Dict[str, Any] = json.loads(f.read_text())
        if self.manifest.get("format") != st.FORMAT:
            raise ValueError(f"{f}: format {self.manifest.get('format')!r} is not {st.FORMAT!r}")
        self.grid: Tuple[int, int] = tuple(self.manifest["grid"])
        self.bits: int = self.manifest["bits_per_token"]
        self.split_bits: Tuple[int, ...] = tuple(self.manifest["subtoken_bits"])
        self._lance = None

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def splits(self) -> List[str]:
        return sorted(self.manifest["counts"])

    # --- codec ---------------------------------------------------------------------------------------
    def unpack(self, packed: Sequence[bytes]) -> np.ndarray:
        """Packed rows -> (N, h, w) int64 indices."""
        out = np.empty((len(packed), self.tokens_per_image), dtype=np.int64)
        for i, b in enumerate(packed):
            out[i] = unpack_tokens(b, self.tokens_per_image, self.bits)
        return out.reshape(len(packed), *self.grid)

    def subtokens(self, indices: np.ndarray) -> Tuple[np.ndarray, ...]:
        return split_index(indices, self.split_bits)

    # --- Lance ---------------------------------------------------------------------------------------
    def lance(self):
        if self._lance is None:
            import lance

            self._lance = lance.dataset(str(self.root / wr.LANCE_DIR))
        return self._lance

    def provenance(self) -> Dict[str, Any]:
        """The settings stored in the Lance schema metadata."""
        meta = self.lance().schema.metadata or {}
        return json.loads(meta[b"open-magvit2"])

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
    def mds_dir(self, split: str) -> Path:
        return wr.mds_split_dir(self.root, split)

    def streaming(self, split: str, local: str | Path, **kwargs):
        """A StreamingDataset over the split's shards (``local``: a cache directory of its own, since
        compressed shards get decompressed copies). Samples carry ``tokens`` as (h, w) int64."""
        from streaming import StreamingDataset

        grid, bits, n = self.grid, self.bits, self.tokens_per_image

        class _Tokens(StreamingDataset):
            def get_item(self, idx: int) -> Dict[str, Any]:
                s = super().get_item(idx)
                s["tokens"] = unpack_tokens(s["tokens"], n, bits).reshape(grid)
                return s

        return _Tokens(remote=str(self.mds_dir(split)), local=str(local), **kwargs)

    def read_mds(self, split: str, local: str | Path) -> Dict[str, Any]:
        """Every MDS sample of a split, in storage order, as columns (tests and inspection)."""
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        ds = self.streaming(split, local, shuffle=False, batch_size=1)
        rows = [ds[i] for i in range(ds.num_samples)]
        return {"id": [r["id"] for r in rows], "label": [int(r["label"]) for r in rows],
                "view": [int(r["view"]) for r in rows],
                "tokens": np.stack([r["tokens"] for r in rows]) if rows else np.zeros((0, *self.grid), np.int64)}

    # --- sizes ---------------------------------------------------------------------------------------
    def bytes_per_token(self) -> Dict[str, Dict[str, float]]:
        """On-disk bytes / stored tokens for each store, everything under the store counted."""
        rows = sum(c["rows"] for c in self.manifest["counts"].values())
        tokens = rows * self.tokens_per_image
        out = {}
        for name, path in (("lance", self.root / wr.LANCE_DIR), ("mds", self.root / wr.MDS_DIR)):
            size = wr.store_bytes(path)
            out[name] = {"bytes": size, "tokens": tokens, "bytes_per_token": size / tokens if tokens else float("nan")}
        return out
