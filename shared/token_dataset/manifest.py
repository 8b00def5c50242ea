"""manifest.json: its schema and validation (``Manifest``, ``SplitCounts``; the ``commits`` block through
``checksums.check_commits``), the one reader and the one writer of the file, and the producer settings the
manifest's fields come from."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from shared import atomic, object_store
from shared.token_dataset.checksums import SHA256_HEX, check_commits
from shared.token_dataset.layout import (BIT_ORDER, FORMAT, LANCE_COLUMNS, LANCE_DIR, LANCE_FORMAT, MANIFEST,
                                         MDS_COLUMNS, MDS_COMPRESSION, MDS_DIR, VERSION, ManifestError, PathOrUri,
                                         check_int, check_keys, check_split_name, fail, is_remote)
from shared.token_dataset.packing import Packing
from shared.token_dataset.provenance import TOKENIZER_WEIGHT_SETS, code_version

# The manifest fields a producer decides (with the format), recorded before any row is written.
SETTINGS = ("tokenizer", "resolution", "views", "grid", "bits_per_token", "subtoken_bits", "classes")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def producer_settings(*, tokenizer: Mapping[str, Any], resolution: int, views, grid, bits_per_token: int,
                      subtoken_bits, classes, **extra: Any) -> Dict[str, Any]:
    """Everything that decides token values and the row layout, as a producer records it (dataprep's
    state.json, the Lance schema metadata): the ``SETTINGS`` of the manifest, the format and ``extra``
    (the job's own, e.g. its precision)."""
    return {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "resolution": resolution,
            "views": list(views), "grid": list(grid), "bits_per_token": bits_per_token, "bit_order": BIT_ORDER,
            "subtoken_bits": list(subtoken_bits), "classes": list(classes), **extra}


def _str_list(v: Any, where: str) -> Tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
        raise ManifestError(f"{where} must be a non-empty list of non-empty strings, got {v!r}")
    if len(set(v)) != len(v):
        raise ManifestError(f"{where} lists a name more than once")
    return tuple(v)


def _int_list(v: Any, where: str, low: int) -> Tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise ManifestError(f"{where} must be a non-empty list of integers, got {v!r}")
    return tuple(check_int(x, where, low) for x in v)


@dataclass(frozen=True)
class SplitCounts:
    """What one split holds. ``rows`` = encoded images x views; ``per_class`` counts encoded images."""

    images: int
    encoded_images: int
    failed_images: int
    rows: int
    per_class: Dict[str, int]
    complete: bool

    def check(self, where: str, num_classes: int, num_views: int) -> None:
        for name in ("images", "encoded_images", "failed_images", "rows"):
            check_int(getattr(self, name), f"{where}.{name}")
        if not isinstance(self.complete, bool):
            raise fail(where, f"complete must be true or false, got {self.complete!r}")
        done = self.encoded_images + self.failed_images
        if done > self.images or (self.complete and done != self.images):
            raise fail(where, f"{self.encoded_images} encoded + {self.failed_images} failed images do not add up "
                              f"to {self.images} images (complete={self.complete})")
        if self.rows != self.encoded_images * num_views:
            raise fail(where, f"rows is {self.rows}, {self.encoded_images} encoded images x {num_views} views "
                              f"make {self.encoded_images * num_views}")
        if not isinstance(self.per_class, dict):
            raise fail(where, "per_class must be an object {label: images}")
        for k, v in self.per_class.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < num_classes):
                raise fail(where, f"per_class label {k!r} is not one of 0..{num_classes - 1}")
            check_int(v, f"{where}.per_class[{k}]")
        if sum(self.per_class.values()) != self.encoded_images:
            raise fail(where, f"per_class sums to {sum(self.per_class.values())}, not {self.encoded_images} "
                              "encoded images")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["per_class"] = dict(sorted(self.per_class.items(), key=lambda kv: int(kv[0])))
        return d


_SPLIT_KEYS = {f.name for f in dataclasses.fields(SplitCounts)}
_TOKENIZER_KEYS = {"preset", "config", "checkpoint_sha256"}
_TOKENIZER_OPTIONAL = {"weights", "source"}  # the weight set, where known; the model reference it came from


def stores(packing: Packing) -> Dict[str, Any]:
    """The ``stores`` block: where each store lives and its column types (readers check it)."""
    lance = dict(LANCE_COLUMNS, tokens=f"fixed_size_binary[{packing.bytes_per_image}]")
    return {"lance": {"path": LANCE_DIR, "format": LANCE_FORMAT, "columns": lance},
            "mds": {"path": f"{MDS_DIR}/<split>", "compression": MDS_COMPRESSION, "columns": dict(MDS_COLUMNS),
                    "sample": "image: tokens are its views' packed rows, concatenated in views order"}}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.json (constructing one checks it; ``to_dict`` is the file's content)."""

    grid: Tuple[int, int]
    bits_per_token: int
    subtoken_bits: Tuple[int, ...]
    classes: Tuple[str, ...]
    resolution: int
    views: Tuple[str, ...]
    tokenizer: Dict[str, Any]  # {"preset", "config", "checkpoint_sha256": 64 hex digits[, "weights"][, "source"]}
    counts: Dict[str, SplitCounts]
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    code_version: str = field(default_factory=code_version)
    tokenizer_path: Optional[str] = None  # where the checkpoint was when encoding: a hint for decoding
    commits: Optional[Dict[str, Any]] = None  # see check_commits; None: a manifest without the block
    sources: Optional[Dict[str, Any]] = None  # per split, where its images came from (see check_sources)

    def __post_init__(self):
        where = MANIFEST
        grid = _int_list(self.grid, f"{where}: grid", 1)
        if len(grid) != 2:
            raise fail(where, f"grid must be [h, w], got {list(self.grid)}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "classes", _str_list(self.classes, f"{where}: classes"))
        object.__setattr__(self, "views", _str_list(self.views, f"{where}: views"))
        subs = _int_list(self.subtoken_bits, f"{where}: subtoken_bits", 1)
        object.__setattr__(self, "subtoken_bits", subs)
        Packing(self.bits_per_token, grid[0] * grid[1])  # range checks
        if sum(subs) != self.bits_per_token:
            raise fail(where, f"subtoken_bits {list(subs)} do not add up to bits_per_token {self.bits_per_token}")
        check_int(self.resolution, f"{where}: resolution", 1)
        optional = _TOKENIZER_OPTIONAL & set(self.tokenizer) if isinstance(self.tokenizer, dict) else set()
        tok = check_keys(self.tokenizer, _TOKENIZER_KEYS | optional, f"{where}: tokenizer")
        if tok.get("weights", TOKENIZER_WEIGHT_SETS[0]) not in TOKENIZER_WEIGHT_SETS:
            raise fail(where, f"tokenizer.weights must be one of {', '.join(TOKENIZER_WEIGHT_SETS)}, "
                              f"got {tok['weights']!r}")
        if not isinstance(tok.get("source", {}), dict):
            raise fail(where, f"tokenizer.source must be an object (a model reference's record), "
                              f"got {type(tok['source']).__name__}")
        if not isinstance(tok["preset"], str) or not isinstance(tok["config"], dict):
            raise fail(where, "tokenizer.preset must be a string and tokenizer.config an object")
        if not isinstance(tok["checkpoint_sha256"], str) or not SHA256_HEX.match(tok["checkpoint_sha256"]):
            raise fail(where, f"tokenizer.checkpoint_sha256 must be 64 hex digits, got {tok['checkpoint_sha256']!r}")
        if not isinstance(self.counts, dict) or not self.counts:
            raise fail(where, "counts must name at least one split")
        for name, c in self.counts.items():
            try:
                check_split_name(name)
            except ManifestError as e:
                raise fail(where, str(e)) from None
            if not isinstance(c, SplitCounts):
                raise fail(where, f"counts.{name} must be SplitCounts, got {type(c).__name__}")
            c.check(f"{where}: counts.{name}", len(self.classes), len(self.views))
        for name in ("created", "updated", "code_version"):
            if not isinstance(getattr(self, name), str):
                raise fail(where, f"{name} must be a string")
        if self.tokenizer_path is not None and not isinstance(self.tokenizer_path, str):
            raise fail(where, "tokenizer_path must be a string or null")
        if self.commits is not None:
            check_commits(self.commits, self.counts, where)
        if self.sources is not None:
            check_sources(self.sources, self.counts, where)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **rest: Any) -> "Manifest":
        """The manifest of a producer's ``settings`` (``producer_settings``) and the other fields in ``rest``."""
        return cls(**{k: settings[k] for k in SETTINGS}, **rest)

    def settings(self) -> Dict[str, Any]:
        """Its ``producer_settings`` (for a producer without settings of its own, e.g. a synthetic dataset)."""
        return producer_settings(**{k: getattr(self, k) for k in SETTINGS})

    @property
    def lance_version(self) -> Optional[int]:
        """The Lance version that holds exactly the committed rows (None: no record, read the latest)."""
        return self.commits["lance_version"] if self.commits else None

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def failures(self) -> int:
        return sum(c.failed_images for c in self.counts.values())

    @property
    def packing(self) -> Packing:
        return Packing(self.bits_per_token, self.tokens_per_image)

    @property
    def splits(self) -> List[str]:
        return sorted(self.counts)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "packing": self.packing.to_dict(),
            "bits_per_token": self.bits_per_token, "bit_order": BIT_ORDER, "subtoken_bits": list(self.subtoken_bits),
            "grid": list(self.grid), "tokens_per_image": self.tokens_per_image,
            "num_classes": self.num_classes, "classes": list(self.classes),
            "resolution": self.resolution, "views": list(self.views), "tokenizer": self.tokenizer,
            "counts": {k: c.to_dict() for k, c in sorted(self.counts.items())}, "failures": self.failures,
            "stores": stores(self.packing), "created": self.created, "updated": self.updated,
            "code_version": self.code_version, "tokenizer_path": self.tokenizer_path,
            **({"commits": self.commits} if self.commits is not None else {}),
            **({"sources": self.sources} if self.sources is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST) -> "Manifest":
        """Validate a parsed manifest.json; every problem is one ManifestError line naming ``where``."""
        if not isinstance(d, dict):
            raise fail(where, "not a JSON object")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            v = d.get("version")
            hint = ""
            if d.get("format") == FORMAT and isinstance(v, int):
                hint = " (an older dataset: encode it again with dataprep)" if v < VERSION else \
                    " (written by a newer version of this code)"
            raise fail(where, f"expected format {FORMAT!r} version {VERSION}, got {d.get('format')!r} version "
                              f"{v!r}{hint}")
        d = check_keys(d, set(_MANIFEST_KEYS) | ({"commits", "sources"} & set(d)), where)  # both optional
        if d["bit_order"] != BIT_ORDER:
            raise fail(where, f"bit order {d['bit_order']!r} is not supported (only {BIT_ORDER!r})")
        counts = {}
        for name, c in (d["counts"].items() if isinstance(d["counts"], dict) else ()):
            c = check_keys(c, _SPLIT_KEYS, f"{where}: counts.{name}")
            counts[name] = SplitCounts(**c)
        try:
            m = cls(grid=d["grid"], bits_per_token=d["bits_per_token"], subtoken_bits=d["subtoken_bits"],
                    classes=d["classes"], resolution=d["resolution"], views=d["views"], tokenizer=d["tokenizer"],
                    counts=counts, created=d["created"], updated=d["updated"], code_version=d["code_version"],
                    tokenizer_path=d["tokenizer_path"], commits=d.get("commits"), sources=d.get("sources"))
        except ManifestError as e:  # name the file actually read
            msg = str(e)
            raise ManifestError(msg.replace(MANIFEST, where, 1) if msg.startswith(MANIFEST) else f"{where}: {msg}") \
                from None
        if Packing.from_dict(d["packing"], where) != m.packing:
            raise fail(where, f"packing {d['packing']['bits']} bits x {d['packing']['tokens_per_image']} tokens does "
                              f"not match bits_per_token {m.bits_per_token} and grid {list(m.grid)}")
        derived = {"tokens_per_image": m.tokens_per_image, "num_classes": m.num_classes, "failures": m.failures,
                   "stores": stores(m.packing)}
        for key, want in derived.items():
            if d[key] != want:
                raise fail(where, f"{key} is {d[key]!r}, the rest of the manifest gives {want!r}")
        return m


SOURCE_FORMATS = ("folder", "file-list", "parquet", "webdataset")


def check_sources(sources: Any, counts: Mapping[str, SplitCounts], where: str) -> None:
    """``sources``: {split: {"uri", "format", ...}}, what dataprep read each split from. Shard formats list
    their shards ({"name", "size", "etag" or "mtime_ns", "records", "error"}: what a rerun compares); the
    format's options and where the class names came from (``classes_from``) go beside them."""
    if not isinstance(sources, dict):
        raise fail(where, "sources must be an object {split: source}")
    for split, src in sources.items():
        at = f"sources.{split}"
        if split not in counts:
            raise fail(where, f"{at}: no such split in counts")
        if not isinstance(src, dict) or not isinstance(src.get("uri"), str) or \
                src.get("format") not in SOURCE_FORMATS:
            raise fail(where, f"{at} must be an object with a uri and a format ({', '.join(SOURCE_FORMATS)})")
        shards = src.get("shards")
        if shards is None:
            continue
        if not isinstance(shards, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in shards):
            raise fail(where, f"{at}.shards must be a list of objects with a name")
        for x in shards:
            check_int(x.get("size"), f"{where}: {at}.shards[{x['name']}].size")
            check_int(x.get("records"), f"{where}: {at}.shards[{x['name']}].records")
            if not isinstance(x.get("error"), (str, type(None))):
                raise fail(where, f"{at}.shards[{x['name']}].error must be a string or null")


_MANIFEST_KEYS = ("format", "version", "packing", "bits_per_token", "bit_order", "subtoken_bits", "grid",
                  "tokens_per_image", "num_classes", "classes", "resolution", "views", "tokenizer", "counts",
                  "failures", "stores", "created", "updated", "code_version", "tokenizer_path")


# --- the file ---------------------------------------------------------------------------------------------

def read_manifest(dataset: PathOrUri, cache_dir: Optional[str] = None) -> Manifest:
    """The validated manifest of a dataset directory or remote URI (s3://, gs://, ...)."""
    dataset = str(dataset)
    if object_store.is_s3(dataset):
        where = object_store.join(dataset, MANIFEST)
        try:
            data = object_store.get_bytes(where)
        except object_store.StoreError as e:
            raise ManifestError(f"cannot read {MANIFEST}: {e}") from None
        if data is None:
            raise ManifestError(f"{object_store.redact(dataset)} is not a token dataset: {MANIFEST} is missing "
                                "(not published, or still being published)")
        return _parse_manifest(data, object_store.redact(where))
    if is_remote(dataset):  # other schemes: Streaming's downloader knows them
        from streaming.base.storage.download import CloudDownloader

        local = Path(cache_dir or tempfile.mkdtemp(prefix="manifest-")) / MANIFEST
        if local.exists():  # the downloader never overwrites; a stale copy must not win
            local.unlink()
        try:
            CloudDownloader.direct_download(dataset.rstrip("/") + "/" + MANIFEST, str(local))
        except Exception as e:
            raise ManifestError(f"cannot fetch {MANIFEST} from {dataset}: {type(e).__name__}: {e}") from None
        return _parse_manifest(local.read_bytes(), dataset.rstrip("/") + "/" + MANIFEST)
    path = Path(dataset) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{dataset} is not a token dataset: {MANIFEST} is missing")
    return _parse_manifest(path.read_bytes(), str(path))


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        d = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from None
    return Manifest.from_dict(d, where)


def write_manifest(root: PathOrUri, manifest: Manifest) -> Dict[str, Any]:
    """Write DATASET/manifest.json atomically; returns its content."""
    d = manifest.to_dict()
    atomic.write_text(Path(root) / MANIFEST, json.dumps(d, indent=1) + "\n")
    return d
