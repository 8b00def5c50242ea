"""Reading a token dataset: ``TokenDataset`` (the manifest, the Lance table and the MDS shards, local or on
object storage) and ``TokenStream``, the one StreamingDataset that turns an MDS sample into token indices.

    ds = TokenDataset("data/imagenet-tokens")    # or "s3://bucket/imagenet-tokens" (see shared.object_store)
    rows = ds.read_lance(split="train")          # dict: id, label, view, path, tokens (N, h, w) int64
    pre, post = ds.subtokens(rows["tokens"])      # (N, h, w) each: index & 63, index >> 6
    stream = ds.streaming("train", local="cache/train", batch_size=64, shuffle=True)  # a TokenStream

Lance is not fork-safe: open it inside each DataLoader worker (``TokenDataset`` opens lazily).

Integrity: a ``TokenStream`` reads its shards through ``VerifiedStream``, which checks every shard file against
the sha1 index.json records for it before a sample of it is read: on download (Streaming's ``validate_hash``,
the compressed file before it is decompressed) and, for copies already in the cache when the stream is
opened, at opening (a damaged cached copy is dropped and fetched again). A shard that does not match, is
missing or cannot be read raises ``ShardError`` (one line naming the shard) in the process that read it;
object-store reads that fail transiently are retried with backoff for ``retry_seconds`` first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState

from shared import object_store
from shared.token_dataset.layout import (LANCE_DIR, MDS_DIR, MDS_HASH, PROVENANCE_KEY, ManifestError, PathOrUri,
                                         dataset_uri, is_remote, lance_uri)
from shared.token_dataset.manifest import Manifest, read_manifest, stores
from shared.token_dataset.packing import Packing, mds_rows
from shared.token_dataset.shm import clean_stale_streaming_shm
from shared.tokens import split_index

log = logging.getLogger("shared.token_dataset")


class ShardError(RuntimeError):
    """A shard is missing, unreadable or does not match its index.json checksum; the message is one line."""


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:400]


def _transient(e: BaseException) -> bool:
    """Whether a failed read may succeed later (an unreachable endpoint, a timeout, a server error), as
    opposed to a missing object, a refused credential or a local file that is not there."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:
        from botocore import exceptions as bex
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bex = None
    if bex is not None:
        if isinstance(e, bex.ClientError):
            err = e.response.get("Error", {})
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or status == 429 or err.get("Code") in ("SlowDown", "Throttling", "RequestTimeout")
        if isinstance(e, (bex.HTTPClientError, bex.ConnectionError)):
            return True
    try:  # a transfer whose connection broke mid-body, after boto's own retries
        from s3transfer.exceptions import RetriesExceededError
    except ImportError:  # pragma: no cover
        RetriesExceededError = ()
    if isinstance(e, RetriesExceededError):
        return True
    return isinstance(e, (ConnectionError, TimeoutError))


def _sha(path: str) -> str:
    h = hashlib.new(MDS_HASH)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class VerifiedStream(Stream):
    """A Streaming ``Stream`` that never hands out a shard whose bytes differ from index.json.

    Downloads are checked by Streaming's ``validate_hash`` (sha1, recorded for every file by the writer):
    the compressed file before it is decompressed, an uncompressed one after its copy. Copies found in the
    cache when the stream is opened are checked here (``set_up_local``): a damaged copy is dropped and fetched
    again from the source, where it is checked as any download. Every failure to get a shard becomes a
    ``ShardError`` naming the shard in the source; reads from the source that fail transiently are retried
    with backoff for ``retry_seconds`` (0: once) before that.
    """

    def __init__(self, *, retry_seconds: float = 0.0, **kwargs: Any) -> None:
        super().__init__(validate_hash=MDS_HASH, **kwargs)
        self.retry_seconds = float(retry_seconds)

    def source(self, basename: str) -> str:
        root = str(self.remote if self.remote is not None else self.local).rstrip("/")
        sep = "/" if object_store.is_s3(root) else os.sep
        return sep.join(p for p in (root, self.split, basename) if p)

    def _shard_name(self, shard: Any) -> str:
        raw, zipped = shard.file_pairs[0]
        return self.source((zipped or raw).basename)

    # ---------------------------------------------------------------- cached copies
    def _cached_copy_ok(self, shard: Any) -> bool:
        for raw, zipped in shard.file_pairs:
            for info in (raw, zipped):
                path = os.path.join(self.local, self.split, info.basename) if info else None
                if path and os.path.isfile(path):
                    want = info.hashes.get(MDS_HASH)
                    if want is None:
                        raise ShardError(f"shard {self.source(info.basename)}: index.json records no {MDS_HASH} "
                                         "for it, so it cannot be verified")
                    if os.path.getsize(path) != info.bytes or _sha(path) != want:
                        return False
                    break
        return True

    def set_up_local(self, shards: List[Any], cache_usage_per_shard: np.ndarray) -> None:
        super().set_up_local(shards, cache_usage_per_shard)
        own_cache = self.remote not in (None, self.local)
        for i, shard in enumerate(shards):
            if cache_usage_per_shard[i] and not self._cached_copy_ok(shard):
                if not own_cache:
                    raise ShardError(f"shard {self._shard_name(shard)}: {MDS_HASH} differs from index.json (damaged)")
                log.warning("dropping the damaged cached copy of %s; fetching it again", self._shard_name(shard))
                shard._evict_raw()  # our cache's copy: the source is checked again on download
                shard._evict_zip()
                cache_usage_per_shard[i] = 0

    # ---------------------------------------------------------------- downloads
    def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        if self.remote is None:
            return local
        remote = os.path.join(self.remote, self.split, from_basename)
        deadline = time.monotonic() + self.retry_seconds
        delay, warned = 0.5, False
        while True:
            try:
                self._downloader.download(remote, local, self.download_timeout)
                return local
            except Exception as e:
                if not _transient(e):
                    raise
                if time.monotonic() + delay > deadline:
                    where = object_store.endpoint() or "the object store" if object_store.is_s3(remote) else remote
                    raise ShardError(f"{where} unreachable for {self.retry_seconds:g} s (data.retry_seconds) "
                                     f"reading {self.source(from_basename)}: {_first_line(e)}") from None
                if not warned:
                    log.warning("reading %s failed (%s); retrying for up to %g s", self.source(from_basename),
                                _first_line(e), self.retry_seconds)
                    warned = True
                self._downloader.clean_up()
                time.sleep(delay)
                delay = min(2 * delay, 8.0)

    def prepare_shard(self, shard: Any) -> int:
        try:
            return super().prepare_shard(shard)
        except ShardError:
            raise
        except Exception as e:
            if str(e).startswith("Checksum failure"):
                raise ShardError(f"shard {self._shard_name(shard)}: {MDS_HASH} differs from index.json "
                                 "(damaged)") from None
            raise ShardError(f"cannot read shard {self._shard_name(shard)}: {type(e).__name__}: "
                             f"{_first_line(e)}") from None


class TokenStream(StreamingDataset):
    """A split's MDS samples (one per image: ``id``, ``label``, ``tokens``) with ``tokens`` decoded into the
    raster-order indices of the stored view ``view_of`` picks: (h, w) with a ``grid``, else (T,); when it
    picks None (``view=None``), of all ``views`` stored views in the manifest's order, (V, h, w) or (V, T).
    Subclasses choose a view per sample by overriding ``view_of``. ``get_item(i, raw=True)`` is the stored
    sample, its views' packed rows concatenated."""

    def __init__(self, *, remote: Optional[str], local: str, packing: Packing, views: int,
                 view: Optional[int] = None, grid: Optional[Tuple[int, int]] = None, retry_seconds: float = 0.0,
                 **kwargs: Any) -> None:
        stream = VerifiedStream(remote=remote, local=local, split=kwargs.get("split"), retry_seconds=retry_seconds,
                                download_timeout=kwargs.get("download_timeout"))
        super().__init__(streams=[stream], **kwargs)
        self.packing, self.num_views, self.view, self.grid = packing, views, view, grid
        self._failure: Optional[BaseException] = None

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            # Streaming leaves a shard whose preparation failed PREPARING, and every worker that needs it
            # then waits for ever: hand it back, so that they try (and fail) themselves.
            if self._shard_states[shard_id] == _ShardState.PREPARING:
                self._shard_states[shard_id] = _ShardState.REMOTE
            self._failure = e
            raise

    def on_exception(self, future: Any) -> None:
        # A download thread failed: Streaming re-raises in the future's callback, where it is only logged
        # (a traceback, and nothing stops); here it is kept for the iterating thread to raise. The thread
        # died without saying it exited, and the end of the epoch waits for that: it is said here.
        e = future.exception()
        if e is not None:
            self._failure = self._failure or e
            self._event.set()
            if hasattr(self, "_iterator"):
                self._iterator.on_exit()

    def __iter__(self):
        # Streaming's download threads end the iteration early and silently when they fail (the failure is
        # only printed): here the iteration raises it instead, so no sample is ever skipped without a word.
        self._failure = None
        try:
            yield from super().__iter__()
        except Exception:
            self._stop_threads()
            raise
        if self._failure is not None or (hasattr(self, "_event") and self._event.is_set()):
            self._stop_threads()
            raise self._failure or ShardError("a shard download failed in the background")

    def _stop_threads(self) -> None:
        if hasattr(self, "_event"):
            self._event.set()
        if hasattr(self, "_iterator"):
            self._iterator.exit()

    def view_of(self, sample: Mapping[str, Any]) -> Optional[int]:
        """The stored view ``sample`` gives (None: all of them)."""
        return self.view

    def decode(self, sample: Mapping[str, Any]) -> np.ndarray:
        view = self.view_of(sample)
        if view is None:
            idx = self.packing.decode_views(sample["tokens"], self.num_views)
        else:
            idx = self.packing.decode(self.packing.view(sample["tokens"], view))
        return idx if self.grid is None else idx.reshape(*idx.shape[:-1], *self.grid)

    def get_item(self, idx: int, retry: int = 7, *, raw: bool = False) -> Dict[str, Any]:
        s = super().get_item(idx, retry)
        if not raw:
            s["tokens"] = self.decode(s)
        return s


def open_lance(root: PathOrUri, version: Optional[int]):
    """The dataset's Lance table at ``version`` (None: the latest), on local disk or object storage."""
    import lance

    opts = object_store.lance_options() if object_store.is_s3(root) else None
    return lance.dataset(lance_uri(root), version=version, storage_options=opts)


def store_bytes(path: PathOrUri) -> int:
    """Bytes of every file (or object, on object storage) under ``path``: the whole store, metadata included."""
    if object_store.is_s3(path):
        return sum(size for _, size in object_store.list_objects(str(path)))
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class TokenDataset:
    """A finished dataset, in a local directory or on object storage (``s3://bucket/prefix``); the manifest
    is validated on opening (``ManifestError`` otherwise)."""

    def __init__(self, root: PathOrUri):
        self.remote = is_remote(root)
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        if object_store.is_s3(root):
            object_store.configure()  # hands the environment's endpoint to Streaming too
        self.manifest: Manifest = read_manifest(self.root)
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
                ds = open_lance(self.root, self.manifest.lance_version)
            except (OSError, ValueError) as e:  # Lance's errors carry Rust source locations on later lines
                raise ManifestError(f"cannot open {lance_uri(self.root)} at version "
                                    f"{self.manifest.lance_version}: {str(e).splitlines()[0][:400]}") from None
            have = {f.name: str(f.type) for f in ds.schema}
            want = stores(self.packing)["lance"]["columns"]
            if have != want:
                raise ManifestError(f"{lance_uri(self.root)} has columns {have}, the manifest says {want}")
            self._lance = ds
        return self._lance

    def provenance(self) -> Dict[str, Any]:
        """The settings stored in the Lance schema metadata."""
        meta = self.lance().schema.metadata or {}
        return json.loads(meta[PROVENANCE_KEY.encode()])

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
        return dataset_uri(self.root, MDS_DIR, split)

    def streaming(self, split: str, local: PathOrUri, **kwargs: Any) -> TokenStream:
        """A ``TokenStream`` over the split's shards (``local``: a cache directory of its own, since
        compressed shards get decompressed copies). A sample is an image: ``id``, ``label`` and ``tokens``
        (V, h, w) int64, its views in the manifest's ``views`` order (``view=K``: view K's (h, w))."""
        return TokenStream(remote=self.mds_dir(split), local=str(local), packing=self.packing,
                           views=len(self.manifest.views), grid=self.grid, **kwargs)

    def read_mds(self, split: str, local: PathOrUri) -> Dict[str, Any]:
        """Every (image, view) row of a split's MDS samples, in storage order, as the columns ``read_lance``
        gives (tests and inspection)."""
        clean_stale_streaming_shm()
        ds = self.streaming(split, local, shuffle=False, batch_size=1)
        rows = [r for i in range(ds.num_samples)
                for r in mds_rows(ds.get_item(i, raw=True), self.packing.bytes_per_image)]
        return {"id": [r[0] for r in rows], "label": [r[1] for r in rows], "view": [r[2] for r in rows],
                "tokens": self.unpack([r[3] for r in rows]) if rows else np.zeros((0, *self.grid), np.int64)}

    # --- sizes ---------------------------------------------------------------------------------------
    def bytes_per_token(self) -> Dict[str, Dict[str, float]]:
        """On-disk bytes / stored tokens for each store, everything under the store counted."""
        rows = sum(c.rows for c in self.manifest.counts.values())
        tokens = rows * self.tokens_per_image
        out = {}
        for name, sub in (("lance", LANCE_DIR), ("mds", MDS_DIR)):
            size = store_bytes(dataset_uri(self.root, sub))
            out[name] = {"bytes": size, "tokens": tokens, "bytes_per_token": size / tokens if tokens else float("nan")}
        return out
