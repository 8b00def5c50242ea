"""Stage-2 data: streamed token shards (MosaicML Streaming MDS) -> (sub-tokens, label) samples.

The dataset is the one dataprep writes, in the format ``shared.token_dataset`` defines (manifest.json
says what the tokens are and how a row's bytes are packed; mds/<split>/ holds the shards, one sample per
image with all its stored views). Training takes one view of each image per epoch (``epoch_view``), so an
epoch is one pass over the images, as in the official recipe (which augments each image on the fly once
per epoch); evaluation always takes view 0. The token datasets' one streaming reader
(``shared.token_dataset.TokenStream``) decodes that view with the manifest's packing; here every index is
split into sub-tokens (6, 12) -> (index & 63, index >> 6), the order the model consumes.

Things that matter for correct multi-device training (see the stack notes):
- the per-device batch size is given to the dataset, so the sample partition is the same one the
  loader state refers to; ``num_canonical_nodes`` is pinned so the order does not depend on how many
  machines a run (or its resumption) uses;
- a StreamingDataset that was iterated in the parent process breaks forked DataLoader workers, so
  ``build_loader`` makes a fresh dataset for every loader and nothing here iterates it eagerly;
- compressed shards read with no remote get decompressed next to themselves, so a local directory is
  always used as the *remote* and a separate cache directory as ``local``;
- a data error (a shard that differs from index.json, is missing or cannot be read, a sample that does not
  decode) is a ``ShardError`` of one line out of ``TokenLoader``, whose workers are then shut down (killed
  if they do not exit: they ignore SIGTERM); ``retry_seconds`` bounds the retries of object-store reads;
- crashed runs leave shared memory behind: ``clean_stale_shared_memory`` at start-up removes what
  killed runs left, never the segments of other streaming jobs on the same node.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from streaming import StreamingDataLoader
from torch.utils.data import DataLoader

from shared import object_store
from shared import token_dataset as td
from shared.preemption import stop_workers, worker_ignores_signals
from shared.token_dataset import Manifest, ManifestError, TokenStream
from shared.token_dataset.reader import ShardError
from shared.tokens import split_index


def check_manifest(manifest: Manifest, model_cfg: Any) -> None:
    """Refuse shards that do not match the model config, with a one-line reason.

    ``model_cfg`` needs ``bits`` (sub-token split), ``grid`` (h, w) and ``num_classes`` (the ARConfig).
    """
    bits = tuple(int(b) for b in model_cfg.bits)
    grid = tuple(int(g) for g in model_cfg.grid)
    checks = [
        ("bits per token", manifest.bits_per_token, sum(bits)),
        ("sub-token split", manifest.subtoken_bits, bits),
        ("token grid", manifest.grid, grid),
        ("number of classes", manifest.num_classes, int(model_cfg.num_classes)),
    ]
    for what, have, want in checks:
        if have != want:
            raise ManifestError(f"token shards do not match the model: {what} is {have} in the manifest, "
                                f"the model config expects {want}")


@dataclass(frozen=True)
class TokenLayout:
    """How to turn one MDS sample (an image with ``views`` stored views) into sub-tokens."""

    tokens_per_image: int
    bits_per_token: int = 18
    subtoken_bits: Tuple[int, ...] = (6, 12)
    views: int = 1

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "TokenLayout":
        return cls(manifest.tokens_per_image, manifest.bits_per_token, manifest.subtoken_bits, len(manifest.views))

    @property
    def packing(self) -> td.Packing:
        return td.Packing(self.bits_per_token, self.tokens_per_image)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """A 64-bit finaliser (splitmix64's): consecutive inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_view(seed: int, epoch: int, image: int, views: int) -> int:
    """The stored view image ``image`` contributes to ``epoch``.

    Epochs run in cycles of ``views``: within a cycle every view is taken exactly once, in an order drawn
    from (seed, cycle, image). A pure function of its arguments, so a resumed run (Streaming restores the
    epoch) takes the same views as an uninterrupted one, whatever the number of workers or devices.
    """
    if views == 1:
        return 0
    cycle, position = divmod(int(epoch), views)
    base = _mix64(_mix64(_mix64(int(seed) & _MASK64) ^ cycle) ^ int(image))
    order = sorted(range(views), key=lambda v: _mix64(base ^ v))
    return order[position]


class TokenShardDataset(TokenStream):
    """Yields ``((sub_0, sub_1, ...), label)``: int64 tensors of shape (T,) and an int64 scalar.

    The token datasets' streaming reader, choosing the view and splitting the indices into sub-tokens.
    ``view_seed``: take each image's view of the current epoch (``epoch_view``); None takes view 0.
    """

    def __init__(self, *, remote: Optional[str], local: str, split: str, layout: TokenLayout,
                 batch_size: int, shuffle: bool = True, shuffle_seed: int = 0,
                 num_canonical_nodes: int = 1, view_seed: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(remote=remote, local=local, packing=layout.packing, views=layout.views, view=0, split=split,
                         batch_size=batch_size, shuffle=shuffle, shuffle_seed=shuffle_seed,
                         num_canonical_nodes=num_canonical_nodes, **kwargs)
        self.layout = layout
        self.view_seed = view_seed
        self.epoch = 0  # the epoch being iterated, in the process that iterates (a DataLoader worker)

    def _resume_incr_epoch(self) -> Tuple[int, int]:
        # Streaming decides here, in the iterating process, which epoch starts (or resumes): the one
        # place that knows it before the samples are drawn.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.epoch = epoch
        return epoch, sample_in_epoch

    def view_of(self, sample: Mapping[str, Any]) -> int:
        if self.view_seed is None:
            return 0
        return epoch_view(self.view_seed, self.epoch, td.parse_image_id(sample["id"])[1], self.layout.views)

    def __getitem__(self, index: int):
        row = super().__getitem__(index)  # its tokens: the (T,) indices of the view ``view_of`` picks
        subs = tuple(torch.from_numpy(np.ascontiguousarray(s))
                     for s in split_index(row["tokens"], self.layout.subtoken_bits))
        return subs, torch.tensor(int(row["label"]), dtype=torch.int64)


def default_cache_dir(dataset: str, root: Optional[str] = None) -> str:
    """A cache directory unique to the dataset URI (two datasets never share one)."""
    name = dataset if td.is_remote(dataset) else os.path.abspath(dataset)
    key = hashlib.sha1(name.encode()).hexdigest()[:12]
    base = Path(root) if root else Path(tempfile.gettempdir()) / "open-magvit2-mds"
    return str(base / key)


def make_dataset(dataset: str, *, split: str, batch_size: int, layout: TokenLayout, cache_dir: Optional[str] = None,
                 shuffle: bool = True, shuffle_seed: int = 0, num_canonical_nodes: int = 1,
                 **kwargs: Any) -> TokenShardDataset:
    """A fresh dataset over ``DATASET/mds/<split>``; local directories are read through a separate cache."""
    if td.is_remote(dataset):
        remote = dataset.rstrip("/") + "/" + td.MDS_DIR
    else:
        remote = str(Path(dataset).resolve() / td.MDS_DIR)
    if object_store.is_s3(dataset):
        try:
            found = object_store.head(object_store.join(remote, split, "index.json")) is not None
        except object_store.StoreError as e:
            raise ManifestError(str(e)) from None
    else:
        found = td.is_remote(dataset) or (Path(remote) / split / "index.json").is_file()
    if not found:
        raise ManifestError(f"{dataset} has no MDS split {split!r} ({td.MDS_DIR}/{split}/index.json is missing)")
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

    def __iter__(self):
        """Batches, counted as Streaming's loader counts them; any error of the data (a damaged, missing or
        unreadable shard, a sample that does not decode, in this process or a worker) ends the iteration
        with one ``ShardError`` line, and the workers are shut down (killed if they do not exit) whatever
        ends it, so a failed run exits instead of waiting on them."""
        self.num_samples_yielded = 0
        batches = DataLoader.__iter__(self)
        try:
            for batch in batches:
                self.num_samples_yielded += self._get_batch_size(batch)
                yield batch
        except Exception as e:
            raise ShardError(worker_error(e)) from None
        finally:
            stop_workers(batches)


def worker_error(e: BaseException) -> str:
    """One line for an exception raised here or re-raised by a DataLoader from a worker (its message then
    holds the worker's whole traceback, whose last line is the error)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Original Traceback" in text and len(lines) > 1:
        kind, sep, msg = lines[-1].partition(": ")
        return msg if sep and kind.endswith(ShardError.__name__) else lines[-1][:400]
    return " ".join(lines)[:400] if isinstance(e, ShardError) else f"{type(e).__name__}: {' '.join(lines)}"[:400]


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


def clean_stale_shared_memory(cache_dirs: Sequence[str] = ()) -> List[str]:
    """Remove shared memory left by killed streaming runs; returns the names removed (on this node).

    Call it at start-up, before any dataset, on every rank. Segments other jobs on the node use stay;
    ``cache_dirs`` (this run's own cache directories) also frees what a killed earlier run of this job
    left. Local rank 0 cleans, and the others wait for it, so no rank registers a segment meanwhile.
    """
    from shared import collectives

    removed = td.clean_stale_streaming_shm(local_dirs=cache_dirs) if os.environ.get("LOCAL_RANK", "0") == "0" else []
    if collectives.active():
        collectives.barrier()
    return removed


def batch_to_inputs(batch: Sequence[Any], device: torch.device) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """Collated ``[[sub_0 (B,T), sub_1 (B,T)], labels (B,)]`` -> tensors on ``device``."""
    subs, labels = batch
    return tuple(s.to(device, non_blocking=True) for s in subs), labels.to(device, non_blocking=True)
