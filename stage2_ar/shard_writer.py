"""Write a token dataset in the dataprep contract format from in-memory token grids.

dataprep/encode.py is the real producer (images -> tokenizer -> Lance + MDS at scale). This small writer
exists so Stage-2 tests and CPU experiments can make contract-exact shards from arrays they already hold:
manifest.json + mds/<split>/ with columns id/label/view/tokens (tokens packed by shared.tokens.pack_tokens).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from streaming import MDSWriter

from shared import atomic
from shared.tokens import pack_tokens

COLUMNS = {"id": "str", "label": "int", "view": "int", "tokens": "bytes"}


def write_split(out_dir: Path, split: str, tokens: np.ndarray, labels: Sequence[int], *, bits: int = 18,
                ids: Optional[Sequence[str]] = None, views: Optional[Sequence[int]] = None,
                size_limit: int = 1 << 26) -> int:
    """Write one split; ``tokens`` is (N, T) raster-order indices. Returns the number of rows."""
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    ids = ids if ids is not None else [f"{split}-{i:08d}" for i in range(n)]
    views = views if views is not None else [0] * n
    with MDSWriter(out=str(Path(out_dir) / "mds" / split), columns=COLUMNS, compression="zstd",
                   size_limit=size_limit) as w:
        for i in range(n):
            w.write({"id": str(ids[i]), "label": int(labels[i]), "view": int(views[i]),
                     "tokens": pack_tokens(tokens[i].reshape(-1), bits).tobytes()})
    return n


def write_manifest(out_dir: Path, *, grid: Sequence[int], classes: Sequence[str], counts: Mapping[str, int],
                   resolution: int, subtoken_bits: Sequence[int] = (6, 12),
                   tokenizer: Optional[Dict[str, Any]] = None, views: Sequence[str] = ("center",)) -> Dict[str, Any]:
    h, w = (int(g) for g in grid)
    manifest = {
        "format": "open-magvit2-tokens", "version": 1,
        "bits_per_token": int(sum(subtoken_bits)), "bit_order": "little-endian-channel",
        "subtoken_bits": [int(b) for b in subtoken_bits], "grid": [h, w], "tokens_per_image": h * w,
        "num_classes": len(classes), "classes": sorted(classes), "resolution": int(resolution),
        "views": list(views), "tokenizer": tokenizer or {}, "counts": dict(counts), "failures": 0,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "code_version": "stage2-shard-writer",
    }
    atomic.write_text(Path(out_dir) / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
