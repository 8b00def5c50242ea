"""Shard sources (Parquet files, WebDataset tars): the listing the driver holds, how chunks fall on shards,
and the Ray task that streams a chunk's records out of them.

The driver holds one entry per shard (name, size, ETag or modification time, record count), never one per
image: 1.28 M ImageNet images in 294 Parquet files or 1,024 tars are a few hundred kilobytes. An image's
``index`` (the number in its row ids) is its position in the concatenation of the shards in listing order,
so chunks (``--chunk-size`` consecutive indices) and the tokenizer's batches within them (``--batch-size``)
are the same as for a folder holding the same images in the same order: the tokens are identical.

A shard that cannot be read at all (not a tar, a truncated Parquet file, no permission), or that is damaged
part-way (its records before the damage are kept), takes one more index: a failure whose path is the
shard's name and whose reason says what is wrong; the job carries on.

A read task gets one chunk: the segments of the shards it covers (shard-local positions ``[start, stop)``),
opens each shard once (a local file, or ``ObjectReader`` ranged GETs on S3), streams those records in order
and emits groups of ``batch`` records with their encoded bytes; decoding and cropping are the next stage's
(``pipeline.decode_group``, the same code as for image files).
"""
from __future__ import annotations

import bisect
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from dataprep.cli import first_line
from dataprep.sources import patterns
from dataprep.sources.parquet import ParquetFormat
from dataprep.sources.records import Inspection, Outcome, SourceError
from dataprep.sources.webdataset import WebDatasetFormat
from shared import object_store as store

FORMATS = {"parquet": ParquetFormat, "webdataset": WebDatasetFormat}
READ_BLOCK = 8 << 20  # bytes per ranged GET when a read task streams a shard from S3
LIST_BLOCK = 1 << 20  # ... when the listing reads footers / member headers
LIST_THREADS = 16  # shards inspected at once by the driver (I/O bound)


def open_shard(uri: str, size: int, etag: str = "", block: int = READ_BLOCK) -> BinaryIO:
    """A shard as a seekable binary file: a local file, or an S3 object pinned to the ETag listed."""
    if store.is_s3(uri):
        return store.ObjectReader(uri, size, etag or None, block)
    return open(uri, "rb")


@dataclass(frozen=True)
class ListedShard:
    shard: patterns.Shard
    records: int
    error: Optional[str] = None  # damage: one more index, a failure named after the shard
    ignored: int = 0

    @property
    def slots(self) -> int:
        return self.records + (1 if self.error else 0)

    def to_dict(self) -> Dict[str, Any]:
        d = {**self.shard.to_dict(), "records": self.records, "error": self.error}
        return {**d, "ignored": self.ignored} if self.ignored else d


@dataclass
class ShardListing:
    """What the driver knows of a shard source; the same interface as ``dataprep.listing.Listing`` where
    ``encode`` uses it (``num_images``, ``classes``, ``ignored``, ``sha256``)."""

    fmt: str
    uri: str  # --data as given (credentials redacted)
    shards: List[ListedShard]
    classes: List[str]
    classes_from: str
    options: Dict[str, Any]
    _starts: List[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        total, self._starts = 0, []
        for s in self.shards:
            self._starts.append(total)
            total += s.slots

    @property
    def num_images(self) -> int:
        return sum(s.slots for s in self.shards)

    @property
    def ignored(self) -> int:
        return sum(s.ignored for s in self.shards)

    def record(self) -> Dict[str, Any]:
        """The source as the manifest records it (``sources.<split>``)."""
        return {"uri": self.uri, "format": self.fmt, **self.options, "classes_from": self.classes_from,
                "records": self.num_images, "shards": [s.to_dict() for s in self.shards]}

    def sha256(self) -> str:
        # the URI and the class names' origin aside (the classes are the settings'): what the rerun compares
        rec = {k: v for k, v in self.record().items() if k not in ("uri", "classes_from")}
        return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()

    def segments(self, lo: int, hi: int) -> List[Dict[str, Any]]:
        """The shard-local ranges of indices [lo, hi), in order."""
        out = []
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        while i < len(self.shards) and self._starts[i] < hi:
            s, base = self.shards[i], self._starts[i]
            a, b = max(lo, base) - base, min(hi, base + s.slots) - base
            if a < b:
                out.append({"name": s.shard.name, "uri": s.shard.uri, "size": s.shard.size, "etag": s.shard.etag,
                            "records": s.records, "error": s.error, "start": a, "stop": b})
            i += 1
        return out

    def work_rows(self, split: str, chunks: Sequence[Tuple[int, int]], todo: Sequence[int],
                  batch_size: int) -> List[Dict[str, Any]]:
        """One Ray row per chunk to encode: its index range and the shard segments that hold it."""
        return [{"split": split, "chunk": c, "lo": chunks[c][0], "hi": chunks[c][1], "batch": batch_size,
                 "segments": json.dumps(self.segments(*chunks[c]))} for c in todo]

    def read_kwargs(self) -> Dict[str, Any]:
        """``read_chunk``'s keyword arguments (the endpoint too: Ray workers do not see the driver's option)."""
        return {"fmt": self.fmt, "options": dict(self.options), "num_classes": len(self.classes),
                "endpoint": store.endpoint()}


def _unique(names: List[str]) -> List[str]:
    """Class names as the manifest needs them (distinct): a repeated name gets its label appended
    (ImageNet's two 'crane' classes: 'crane (134)', 'crane (517)')."""
    seen: Dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} ({i})" if seen[n] > 1 else n for i, n in enumerate(names)]


def _classes(names_option: Optional[Tuple[str, List[str]]], num_classes: Optional[int],
             found: Optional[List[str]], fmt: str) -> Tuple[List[str], str]:
    if names_option is not None:
        where, names = names_option
        if num_classes is not None and num_classes != len(names):
            raise SourceError(f"--num-classes {num_classes} but --class-names {where} names {len(names)} classes")
        return _unique(names), f"--class-names {where}"
    if found is not None and (num_classes is None or num_classes == len(found)):
        return _unique(found), "parquet metadata (huggingface ClassLabel names)"
    if num_classes is not None:
        return [str(i) for i in range(num_classes)], "--num-classes"
    raise SourceError(f"the {fmt} source does not name its classes: give --class-names FILE (one name per line, "
                      "line i = label i) or --num-classes N (labels are checked against them)")


def list_source(fmt: str, pattern: str, options: Dict[str, Any], *, names_option=None,
                num_classes: Optional[int] = None, prior: Optional[Dict[str, Any]] = None,
                log: Callable[[str], None] = lambda _: None, threads: int = LIST_THREADS) -> ShardListing:
    """Match the pattern, inspect every shard (footers / member headers, ``threads`` at a time; a shard
    recorded by an earlier run of this split with the same identity and options is not read again) and
    decide the classes. SourceError / PatternError (one line) for a source that cannot be encoded."""
    reader = FORMATS[fmt](options)
    options = reader.options()
    _, shards = patterns.match(pattern)
    known: Dict[str, Dict[str, Any]] = {}
    if prior and prior.get("format") == fmt and all(prior.get(k) == v for k, v in options.items()):
        known = {d["name"]: d for d in prior.get("shards", [])}

    def inspect(s: patterns.Shard) -> Tuple[Inspection, bool]:
        d = known.get(s.name)
        if d is not None and patterns.Shard(d["name"], s.uri, d["size"], d.get("etag", ""),
                                            d.get("mtime_ns", 0)).identity() == s.identity():
            return Inspection(d["records"], None, d.get("ignored", 0), d.get("error")), True
        try:
            with open_shard(s.uri, s.size, s.etag, LIST_BLOCK) as f:
                return reader.inspect(f), False
        except SourceError as e:
            raise SourceError(f"{s.name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - whatever stops a shard from being read is recorded, not fatal
            return Inspection(0, None, 0, f"unreadable shard: {first_line(e, with_type=True)}"), False

    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards))))
    try:
        results = list(pool.map(inspect, shards))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    listed = [ListedShard(s, r.records, r.error, r.ignored) for s, (r, _) in zip(shards, results)]
    for s, (r, reused) in zip(shards, results):
        if not reused and r.records and not r.labelled:
            raise SourceError(f"{s.name}: none of its {r.records} samples has a .{options.get('label_key')} member "
                              "(the labels); give --label-key")
    if not any(s.records for s in listed):
        bad = next((s for s in listed if s.error), None)
        raise SourceError(f"the {len(shards)} shards of {store.redact(pattern)} hold no images"
                          + (f" ({bad.shard.name}: {bad.error})" if bad else ""))
    found = next((r.names for r, _ in results if r.names), None)
    if found is None and names_option is None and fmt == "parquet" and any(reused for _, reused in results):
        first = next(s for s in listed if s.records and not s.error)  # the names of a shard listed before
        with open_shard(first.shard.uri, first.shard.size, first.shard.etag, LIST_BLOCK) as f:
            found = reader.inspect(f).names
    classes, classes_from = _classes(names_option, num_classes, found, fmt)
    damaged = sum(1 for s in listed if s.error)
    log(f"{store.redact(pattern)}: {sum(s.records for s in listed)} records in {len(listed)} {fmt} shards"
        + (f", {damaged} damaged or unreadable (one failure each)" if damaged else "")
        + (f", {sum(1 for _, reused in results if reused)} as recorded by the earlier run" if known else ""))
    return ShardListing(fmt, store.redact(pattern), listed, classes, classes_from, options)


# --- the Ray read task --------------------------------------------------------------------------------------

def read_segment(reader, seg: Dict[str, Any], num_classes: int) -> Iterator[Outcome]:
    """Exactly ``stop - start`` outcomes for positions [start, stop) of one shard, whatever the shard holds
    now: records it no longer gives, or cannot give, become failures. Errors of the object store are
    raised (the task fails and Ray retries it; a run that still fails is resumed by the same command)."""
    name, start, stop, records = seg["name"], seg["start"], seg["stop"], seg["records"]
    real, n, reason = min(stop, records), start, ""
    if start < real:
        try:
            with open_shard(seg["uri"], seg["size"], seg.get("etag", "")) as f:
                for outcome in reader.read(f, name, start, real, num_classes):
                    yield outcome
                    n += 1
                    if n >= real:
                        break
        except store.StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a shard damaged or unreadable since it was listed
            reason = f"cannot read {name}: {first_line(e, with_type=True)}"
        while n < real:
            yield Outcome(reader.fallback_path(name, n), -1, None,
                          reason or f"{name} holds fewer records than the {records} listed")
            n += 1
    for _ in range(max(start, records), stop):
        yield Outcome(name, -1, None, seg["error"])


def _group_row(row: Dict[str, Any], group: List[Tuple[int, Outcome]]) -> Dict[str, Any]:
    return {"split": row["split"], "chunk": row["chunk"],
            "items": json.dumps([[i, o.path, o.label, o.reason] for i, o in group]),
            "data": b"".join(o.data or b"" for _, o in group),
            "sizes": json.dumps([len(o.data) if o.data is not None else -1 for _, o in group])}


def read_chunk(row: Dict[str, Any], *, fmt: str, options: Dict[str, Any], num_classes: int,
               endpoint: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """Ray Data ``flat_map``: a chunk row (``ShardListing.work_rows``) -> its groups of ``batch`` records,
    in index order, each with the records' encoded bytes (``pipeline.decode_group`` decodes them)."""
    if endpoint:
        store.configure(endpoint)
    reader = FORMATS[fmt](options)
    index, group = int(row["lo"]), []
    for seg in json.loads(row["segments"]):
        for outcome in read_segment(reader, seg, num_classes):
            group.append((index, outcome))
            index += 1
            if len(group) == int(row["batch"]):
                yield _group_row(row, group)
                group = []
    if group:
        yield _group_row(row, group)
    if index != int(row["hi"]):  # read_segment gives exactly one outcome per position: a bug if not
        raise RuntimeError(f"chunk {row['chunk']}: read {index - int(row['lo'])} records, expected "
                           f"{int(row['hi']) - int(row['lo'])}")
