"""Stage-2 data: streamed token shards (MosaicML Streaming MDS) -> (sub-tokens, label) samples.

The dataset directory is the one dataprep writes:

    DATASET/manifest.json          what the tokens are (bits, sub-token split, grid, classes, tokenizer)
    DATASET/mds/<split>/           MDS shards; columns id:str, label:int, view:int, tokens:bytes

``tokens`` holds the raster-order 18-bit indices packed by ``shared.tokens.pack_tokens``; we unpack them
and split each index into sub-tokens (6, 12) -> (index & 63, index >> 6), the order the model consumes.

Things that matter for correct multi-device training (see the stack notes):
- the per-device batch size is given to the dataset, so the sample partition is the same one the
  loader state refers to; ``num_canonical_nodes`` is pinned so the order does not depend on how many
  machines a run (or its resumption) uses;
- a StreamingDataset that was iterated in the parent process breaks forked DataLoader workers, so
  ``build_loader`` makes a fresh dataset for every loader and nothing here iterates it eagerly;
- compressed shards read with no remote get decompressed next to themselves, so a local directory is
  always used as the *remote* and a separate cache directory as ``local``;
- crashed runs leave shared memory behind: ``clean_stale_shared_memory`` at start-up (training only:
  it also removes segments of any other streaming job running on the same machine).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from shared.preemption import worker_ignores_signals

from shared.tokens import split_index, unpack_tokens

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "open-magvit2-tokens"
MANIFEST_VERSION = 1
MDS_DIR = "mds"


class ManifestError(ValueError):
    """Token shards that cannot feed the configured model (wrong bits, split, grid or classes)."""


def _is_remote(uri: str) -> bool:
    return "://" in uri


def read_manifest(dataset: str, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """The dataset's manifest.json, from a local directory or a remote URI (s3://, gs://, ...)."""
    if _is_remote(dataset):
        from streaming.base.storage.download import CloudDownloader

        local = Path(cache_dir or tempfile.mkdtemp(prefix="manifest-")) / MANIFEST
        if local.exists():  # the downloader never overwrites; a stale copy must not win
            local.unlink()
        try:
            CloudDownloader.direct_download(dataset.rstrip("/") + "/" + MANIFEST, str(local))
        except Exception as e:
            raise ManifestError(f"cannot fetch {MANIFEST} from {dataset}: {type(e).__name__}: {e}") from None
        path = local
    else:
        path = Path(dataset) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{dataset} is not a token dataset: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: expected format {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}, "
                            f"got {manifest.get('format')!r} version {manifest.get('version')!r}")
    return manifest


def check_manifest(manifest: Dict[str, Any], model_cfg: Any) -> None:
    """Refuse shards that do not match the model config, with a one-line reason.

    ``model_cfg`` needs ``bits`` (sub-token split), ``grid`` (h, w) and ``num_classes`` (the ARConfig).
    """
    bits = tuple(int(b) for b in model_cfg.bits)
    grid = tuple(int(g) for g in model_cfg.grid)
    checks = [
        ("bits per token", manifest.get("bits_per_token"), sum(bits)),
        ("sub-token split", tuple(manifest.get("subtoken_bits") or ()), bits),
        ("token grid", tuple(manifest.get("grid") or ()), grid),
        ("tokens per image", manifest.get("tokens_per_image"), grid[0] * grid[1]),
        ("number of classes", manifest.get("num_classes"), int(model_cfg.num_classes)),
    ]
    for what, have, want in checks:
        if have != want:
            raise ManifestError(f"token shards do not match the model: {what} is {have} in the manifest, "
                                f"the model config expects {want}")
    order = manifest.get("bit_order", "little-endian-channel")
    if order != "little-endian-channel":
        raise ManifestError(f"token shards use bit order {order!r}; only 'little-endian-channel' is supported")


@dataclass(frozen=True)
class TokenLayout:
    """How to turn one packed row into sub-tokens."""

    tokens_per_image: int
    bits_per_token: int = 18
    subtoken_bits: Tuple[int, ...] = (6, 12)

    @classmethod
    def from_manifest(cls, manifest: Dict[str, Any]) -> "TokenLayout":
        return cls(int(manifest["tokens_per_image"]), int(manifest["bits_per_token"]),
                   tuple(int(b) for b in manifest["subtoken_bits"]))


class TokenShardDataset(StreamingDataset):
    """Yields ``((sub_0, sub_1, ...), label)``: int64 tensors of shape (T,) and an int64 scalar."""

    def __init__(self, *, remote: Optional[str], local: str, split: str, layout: TokenLayout,
                 batch_size: int, shuffle: bool = True, shuffle_seed: int = 0,
                 num_canonical_nodes: int = 1, **kwargs: Any) -> None:
        super().__init__(remote=remote, local=local, split=split, batch_size=batch_size, shuffle=shuffle,
                         shuffle_seed=shuffle_seed, num_canonical_nodes=num_canonical_nodes, **kwargs)
        self.layout = layout

    def __getitem__(self, index: int):
        row = super().__getitem__(index)
        lay = self.layout
        idx = unpack_tokens(row["tokens"], lay.tokens_per_image, lay.bits_per_token)
        subs = tuple(torch.from_numpy(np.ascontiguousarray(s)) for s in split_index(idx, lay.subtoken_bits))
        return subs, torch.tensor(int(row["label"]), dtype=torch.int64)


def default_cache_dir(dataset: str, root: Optional[str] = None) -> str:
    """A cache directory unique to the dataset URI (two datasets never share one)."""
    key = hashlib.sha1(os.path.abspath(dataset).encode() if not _is_remote(dataset) else dataset.encode()).hexdigest()[:12]
    base = Path(root) if root else Path(tempfile.gettempdir()) / "open-magvit2-mds"
    return str(base / key)


def make_dataset(dataset: str, *, split: str, batch_size: int, layout: TokenLayout, cache_dir: Optional[str] = None,
                 shuffle: bool = True, shuffle_seed: int = 0, num_canonical_nodes: int = 1,
                 **kwargs: Any) -> TokenShardDataset:
    """A fresh dataset over ``DATASET/mds/<split>``; local directories are read through a separate cache."""
    remote = dataset.rstrip("/") + "/" + MDS_DIR if _is_remote(dataset) else str(Path(dataset).resolve() / MDS_DIR)
    if not _is_remote(dataset) and not (Path(remote) / split / "index.json").is_file():
        raise ManifestError(f"{dataset} has no MDS split {split!r} ({MDS_DIR}/{split}/index.json is missing)")
    local = cache_dir or default_cache_dir(dataset)
    return TokenShardDataset(remote=remote, local=local, split=split, layout=layout, batch_size=batch_size,
                             shuffle=shuffle, shuffle_seed=shuffle_seed,
                             num_canonical_nodes=num_canonical_nodes, **kwargs)


class TokenLoader(StreamingDataLoader):
    """StreamingDataLoader that counts samples by the label tensor.

    The stock loader counts ``len(batch[0])``, which for our ``[sub-tokens, labels]`` batches is the
    number of sub-tokens (2), and the saved resume point would then be wrong.
    """

    def _get_batch_size(self, batch: Any) -> int:
        return len(batch[1])


def build_loader(dataset: str, *, split: str, batch_size: int, layout: TokenLayout, num_workers: int = 0,
                 cache_dir: Optional[str] = None, shuffle: bool = True, shuffle_seed: int = 0,
                 num_canonical_nodes: int = 1, pin_memory: bool = False, generator: Optional[torch.Generator] = None,
                 **kwargs: Any) -> "TokenLoader":
    """A StreamingDataLoader over a *fresh* dataset (fork trap) with the per-device ``batch_size``.

    ``drop_last`` keeps every step at the same global batch, which exact resumption needs. A dedicated
    ``generator`` keeps the loader from drawing its worker seed from the global torch RNG, so starting an
    iterator (as a resumed run does once more than an uninterrupted one) leaves the dropout stream alone.
    """
    ds = make_dataset(dataset, split=split, batch_size=batch_size, layout=layout, cache_dir=cache_dir,
                      shuffle=shuffle, shuffle_seed=shuffle_seed, num_canonical_nodes=num_canonical_nodes, **kwargs)
    return TokenLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                               pin_memory=pin_memory, persistent_workers=False,
                               worker_init_fn=worker_ignores_signals,  # preemption is the trainer's to handle
                               generator=generator if generator is not None else torch.Generator().manual_seed(0))


def clean_stale_shared_memory() -> None:
    """Remove shared memory left by crashed streaming runs (call once at start-up, before any dataset)."""
    from streaming.base.util import clean_stale_shared_memory as _clean

    _clean()


def batch_to_inputs(batch: Sequence[Any], device: torch.device) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """Collated ``[[sub_0 (B,T), sub_1 (B,T)], labels (B,)]`` -> tensors on ``device``."""
    subs, labels = batch
    return tuple(s.to(device, non_blocking=True) for s in subs), labels.to(device, non_blocking=True)
