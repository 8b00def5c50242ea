"""The token-dataset contract: the one module that knows what a token dataset on disk is.

dataprep writes datasets through it, Stage 2 and the dataprep reader read them through it, and tests make
their synthetic datasets with the same writer (``write_dataset``), so there is no second definition.

    DATASET/manifest.json            what the tokens are; validated by ``read_manifest`` (schema below)
    DATASET/tokens.lance/            Lance table, one row per (image, view): LANCE_COLUMNS
    DATASET/mds/<split>/             MosaicML Streaming shards in chunk-NNNNN/ sub-directories joined by
                                     mds/<split>/index.json: one sample per image (MDS_COLUMNS, zstd)

An MDS sample is an image: ``id`` (``image_id``), ``label`` and ``tokens``, the packed rows of all its
views concatenated in ``views`` order (V x bytes_per_image). Training then sees every image once per
epoch, with one of its views (Stage 2 picks it), as the official recipe's on-the-fly augmentation does;
one sample per (image, view) would make an epoch V passes over the images. ``mds_rows`` expands a
sample back into the (image, view) rows the Lance table holds.

Manifest (format ``open-magvit2-tokens``, version 3): ``packing`` (everything needed to turn a row's
``tokens`` bytes back into indices, see ``Packing``), ``bits_per_token``, ``bit_order`` (how LFQ channels
map to index bits), ``subtoken_bits``, ``grid``, ``tokens_per_image``, ``classes``/``num_classes``,
``resolution``, ``views`` (a row's ``view`` is the position in this list), ``tokenizer`` {preset, config,
checkpoint_sha256}, ``counts`` per split {images, encoded_images, failed_images, rows, per_class,
complete}, ``failures``, ``stores`` (paths and column types), ``created``, ``updated``, ``code_version``,
``tokenizer_path`` (a hint, may be null), and ``commits`` (what was committed, with checksums: see
``check_commits``; absent from datasets written before it existed, which then have no checksums).
Older versions are refused (re-encode them): 1 had no packing block, 2 had one MDS sample per (image, view).

Readers open the Lance table at ``commits.lance_version``: rows a writer appended after the manifest was
written (a split being encoded, a killed job's debris) are not part of the dataset.

Row sizes (measured with pylance 14 / streaming 0.13, 20k rows of 256 uniformly random 18-bit tokens,
sorted ImageNet-like paths): tokens as fixed_size_binary(576) with zstd in the mini-block layout 577.3 B,
id 2.7 B, path 5.0 B, label + view + split 0.4 B: 585 B = 2.29 B/token. A variable-size binary column
would add 8 B/row of offsets (Lance format 2.0) or skip compression (2.1 full-zip layout), hence the fixed
size.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from shared import atomic, object_store

FORMAT = "open-magvit2-tokens"
VERSION = 3
MANIFEST = "manifest.json"
LANCE_DIR = "tokens.lance"
MDS_DIR = "mds"
BIT_ORDER = "little-endian-channel"  # index = sum_c [z_c > 0] * 2^c (shared.tokens)
PROVENANCE_KEY = "open-magvit2"  # Lance schema metadata key holding the producer's settings as JSON

PACKING_CODEC = "lsb-first-bitstream"
PACKING_ORDER = ("token t occupies stream bits [t*bits, (t+1)*bits), least significant bit first; stream bit i "
                 "is bit i % 8 (0 = least significant) of byte i // 8; the last byte is zero-padded")

# Lance column types by name; "tokens" is fixed_size_binary[bytes_per_image] (see the module doc).
LANCE_COLUMNS = {"id": "string", "split": "string", "path": "string", "label": "int32", "view": "int8",
                 "tokens": "fixed_size_binary"}
LANCE_FORMAT = "2.1"
MDS_COLUMNS = {"id": "str", "label": "int", "tokens": "bytes"}  # one image: see the module doc
MDS_COMPRESSION = "zstd"
MDS_HASH = "sha1"  # Streaming records it for every shard file in index.json; verification recomputes it
# Small records (~600 B) shuffle well only when shards are small: Streaming shuffles shard by shard,
# so 4 MiB shards (~7k records) give a 2.5M-row ImageNet dataset several hundred shards to mix.
MDS_SHARD_BYTES = 1 << 22

_ZSTD = {"lance-encoding:compression": "zstd"}
# Level 19 on the small string columns: id 3.9 -> 2.7 and path 6.1 -> 5.0 B/row (sorted ImageNet-like
# listing) for a few seconds of CPU per million rows; it matters, the per-row budget above 576 B is 12.8 B.
_ZSTD_STRINGS = {"lance-encoding:compression": "zstd", "lance-encoding:compression-level": "19"}
_ZSTD_TOKENS = {"lance-encoding:compression": "zstd", "lance-encoding:structural-encoding": "miniblock"}
_LANCE_ENCODING = {"id": _ZSTD_STRINGS, "split": _ZSTD_STRINGS, "path": _ZSTD_STRINGS, "label": _ZSTD,
                   "view": None, "tokens": _ZSTD_TOKENS}

# The packing codec is shared.tokens, imported when first used: it imports torch, which the Ray decode
# tasks (they import this module through dataprep.pipeline for row ids) and the job's argument checks
# should not pay for.
_MAX_BITS = 31  # shared.tokens.MAX_BITS; checked against it in tests
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # used in paths and Lance filters (fullmatch)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PathOrUri = Union[str, os.PathLike]


class ManifestError(ValueError):
    """A token dataset that is missing, malformed, of another format or version, or that does not fit."""


def _fail(where: str, what: str) -> ManifestError:
    return ManifestError(f"{where}: {what}")


def check_split_name(name: Any) -> str:
    """A split name, or ManifestError: it becomes a directory name and a quoted Lance filter value."""
    if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name):
        raise ManifestError(f"split name {name!r} must be letters, digits, '_', '.' or '-', starting with a letter "
                            "or digit")
    return name


def row_id(split: str, index: int, view: int) -> str:
    """Stable id of one (image, view) row: short and sequential, so it compresses to almost nothing."""
    return f"{split}-{index:08d}-{view}"


def image_id(split: str, index: int) -> str:
    """Id of one image (an MDS sample): its rows' ``row_id`` without the view."""
    return f"{split}-{index:08d}"


def parse_image_id(iid: str) -> Tuple[str, int]:
    split, index = iid.rsplit("-", 1)
    return split, int(index)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: PathOrUri, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(ckpt_dir: PathOrUri) -> str:
    """The tokenizer identity the manifest records: sha256 of the checkpoint's weights file."""
    return sha256_file(Path(ckpt_dir) / "model.safetensors")


def code_version(commit: Optional[str] = None) -> str:
    """Package version plus the git commit: ``commit`` when given (a job whose uploaded code has no .git
    passes it along), else read from the checkout's .git beside this package (files only, no subprocess)."""
    from importlib import metadata

    try:
        version = metadata.version("open-magvit2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = commit or git_commit(Path(__file__).resolve().parents[1])
    return f"{version}+{commit}" if commit else version


def git_commit(repo: Path) -> Optional[str]:
    """The abbreviated commit checked out in ``repo`` (loose or packed ref, or a worktree's .git file)."""
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (repo / git.read_text().strip().partition("gitdir: ")[2]).resolve()
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            common = git / "commondir"
            roots = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
            head = next((f.read_text().strip() for f in (r / ref for r in roots) if f.is_file()), "")
            if not head:
                packed = [ln.split() for r in roots if (r / "packed-refs").is_file()
                          for ln in (r / "packed-refs").read_text().splitlines() if not ln.startswith(("#", "^"))]
                head = next((h for h, *name in packed if name == [ref]), "")
    except OSError:
        return None
    return head[:12] if re.fullmatch(r"[0-9a-f]{40,64}", head) else None


# --- packing ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Packing:
    """How one row's ``tokens`` bytes hold its raster-order indices (the codec of ``shared.tokens``)."""

    bits: int
    tokens_per_image: int

    def __post_init__(self):
        if _int(self.bits, "packing: bits", 1) > _MAX_BITS:
            raise ManifestError(f"packing: bits must be an integer in [1, {_MAX_BITS}], got {self.bits}")
        _int(self.tokens_per_image, "packing: tokens_per_image", 1)

    @property
    def bytes_per_image(self) -> int:
        return (self.tokens_per_image * self.bits + 7) // 8  # shared.tokens.packed_nbytes, without torch

    def encode(self, tokens: Any) -> bytes:
        from shared.tokens import pack_tokens

        flat = np.asarray(tokens).reshape(-1)
        if flat.size != self.tokens_per_image:
            raise ValueError(f"a row holds {self.tokens_per_image} tokens, got {flat.size}")
        return pack_tokens(flat, self.bits).tobytes()

    def decode(self, data: Union[bytes, bytearray, memoryview, np.ndarray]) -> np.ndarray:
        """(tokens_per_image,) int64 indices of one row."""
        from shared.tokens import unpack_tokens

        return unpack_tokens(data, self.tokens_per_image, self.bits)

    def view(self, sample_tokens: Union[bytes, bytearray, memoryview], view: int) -> bytes:
        """One view's packed row out of an MDS sample's ``tokens`` (its views' rows concatenated)."""
        n = self.bytes_per_image
        return bytes(sample_tokens[view * n:(view + 1) * n])

    def decode_views(self, sample_tokens: Union[bytes, bytearray, memoryview], views: int) -> np.ndarray:
        """(views, tokens_per_image) int64 indices of an MDS sample's ``tokens``."""
        if len(sample_tokens) != views * self.bytes_per_image:
            raise ValueError(f"an image of {views} views holds {views * self.bytes_per_image} token bytes, got "
                             f"{len(sample_tokens)}")
        return np.stack([self.decode(self.view(sample_tokens, v)) for v in range(views)])

    def to_dict(self) -> Dict[str, Any]:
        return {"codec": PACKING_CODEC, "bits": self.bits, "tokens_per_image": self.tokens_per_image,
                "bytes_per_image": self.bytes_per_image, "order": PACKING_ORDER}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Packing":
        d = _keys(d, {"codec", "bits", "tokens_per_image", "bytes_per_image", "order"}, f"{where}: packing")
        if d["codec"] != PACKING_CODEC or d["order"] != PACKING_ORDER:
            raise _fail(where, f"packing codec {d['codec']!r} is not {PACKING_CODEC!r} in the documented order")
        try:
            p = cls(d["bits"], d["tokens_per_image"])
        except ManifestError as e:
            raise _fail(where, str(e)) from None
        if d["bytes_per_image"] != p.bytes_per_image:
            raise _fail(where, f"packing.bytes_per_image is {d['bytes_per_image']!r}, {p.tokens_per_image} tokens "
                               f"of {p.bits} bits take {p.bytes_per_image}")
        return p


# --- manifest ---------------------------------------------------------------------------------------------

def _keys(d: Any, want: set, where: str) -> Dict[str, Any]:
    if not isinstance(d, dict):
        raise ManifestError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing, extra = sorted(want - set(d)), sorted(set(d) - want)
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
    if problems:
        raise ManifestError(f"{where}: {'; '.join(problems)}")
    return d


def _int(v: Any, where: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ManifestError(f"{where} must be an integer >= {low}, got {v!r}")
    return v


def _str_list(v: Any, where: str) -> Tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
        raise ManifestError(f"{where} must be a non-empty list of non-empty strings, got {v!r}")
    if len(set(v)) != len(v):
        raise ManifestError(f"{where} lists a name more than once")
    return tuple(v)


def _int_list(v: Any, where: str, low: int) -> Tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise ManifestError(f"{where} must be a non-empty list of integers, got {v!r}")
    return tuple(_int(x, where, low) for x in v)


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
            _int(getattr(self, name), f"{where}.{name}")
        if not isinstance(self.complete, bool):
            raise _fail(where, f"complete must be true or false, got {self.complete!r}")
        done = self.encoded_images + self.failed_images
        if done > self.images or (self.complete and done != self.images):
            raise _fail(where, f"{self.encoded_images} encoded + {self.failed_images} failed images do not add up "
                               f"to {self.images} images (complete={self.complete})")
        if self.rows != self.encoded_images * num_views:
            raise _fail(where, f"rows is {self.rows}, {self.encoded_images} encoded images x {num_views} views "
                               f"make {self.encoded_images * num_views}")
        if not isinstance(self.per_class, dict):
            raise _fail(where, "per_class must be an object {label: images}")
        for k, v in self.per_class.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < num_classes):
                raise _fail(where, f"per_class label {k!r} is not one of 0..{num_classes - 1}")
            _int(v, f"{where}.per_class[{k}]")
        if sum(self.per_class.values()) != self.encoded_images:
            raise _fail(where, f"per_class sums to {sum(self.per_class.values())}, not {self.encoded_images} "
                               "encoded images")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["per_class"] = dict(sorted(self.per_class.items(), key=lambda kv: int(kv[0])))
        return d


_SPLIT_KEYS = {f.name for f in dataclasses.fields(SplitCounts)}
_TOKENIZER_KEYS = {"preset", "config", "checkpoint_sha256"}


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
    tokenizer: Dict[str, Any]  # {"preset": str, "config": {...}, "checkpoint_sha256": 64 hex digits}
    counts: Dict[str, SplitCounts]
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    code_version: str = field(default_factory=code_version)
    tokenizer_path: Optional[str] = None  # where the checkpoint was when encoding: a hint for decoding
    commits: Optional[Dict[str, Any]] = None  # see check_commits; None only in datasets older than it

    def __post_init__(self):
        where = MANIFEST
        grid = _int_list(self.grid, f"{where}: grid", 1)
        if len(grid) != 2:
            raise _fail(where, f"grid must be [h, w], got {list(self.grid)}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "classes", _str_list(self.classes, f"{where}: classes"))
        object.__setattr__(self, "views", _str_list(self.views, f"{where}: views"))
        subs = _int_list(self.subtoken_bits, f"{where}: subtoken_bits", 1)
        object.__setattr__(self, "subtoken_bits", subs)
        Packing(self.bits_per_token, grid[0] * grid[1])  # range checks
        if sum(subs) != self.bits_per_token:
            raise _fail(where, f"subtoken_bits {list(subs)} do not add up to bits_per_token {self.bits_per_token}")
        _int(self.resolution, f"{where}: resolution", 1)
        tok = _keys(self.tokenizer, _TOKENIZER_KEYS, f"{where}: tokenizer")
        if not isinstance(tok["preset"], str) or not isinstance(tok["config"], dict):
            raise _fail(where, "tokenizer.preset must be a string and tokenizer.config an object")
        if not isinstance(tok["checkpoint_sha256"], str) or not _SHA256.match(tok["checkpoint_sha256"]):
            raise _fail(where, f"tokenizer.checkpoint_sha256 must be 64 hex digits, got {tok['checkpoint_sha256']!r}")
        if not isinstance(self.counts, dict) or not self.counts:
            raise _fail(where, "counts must name at least one split")
        for name, c in self.counts.items():
            try:
                check_split_name(name)
            except ManifestError as e:
                raise _fail(where, str(e)) from None
            if not isinstance(c, SplitCounts):
                raise _fail(where, f"counts.{name} must be SplitCounts, got {type(c).__name__}")
            c.check(f"{where}: counts.{name}", len(self.classes), len(self.views))
        for name in ("created", "updated", "code_version"):
            if not isinstance(getattr(self, name), str):
                raise _fail(where, f"{name} must be a string")
        if self.tokenizer_path is not None and not isinstance(self.tokenizer_path, str):
            raise _fail(where, "tokenizer_path must be a string or null")
        if self.commits is not None:
            check_commits(self.commits, self.counts, where)

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
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST) -> "Manifest":
        """Validate a parsed manifest.json; every problem is one ManifestError line naming ``where``."""
        if not isinstance(d, dict):
            raise _fail(where, "not a JSON object")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            v = d.get("version")
            hint = ""
            if d.get("format") == FORMAT and isinstance(v, int):
                hint = " (an older dataset: encode it again with dataprep)" if v < VERSION else \
                    " (written by a newer version of this code)"
            raise _fail(where, f"expected format {FORMAT!r} version {VERSION}, got {d.get('format')!r} version "
                               f"{v!r}{hint}")
        d = _keys(d, set(_MANIFEST_KEYS) | ({"commits"} & set(d)), where)  # commits: optional (older datasets)
        if d["bit_order"] != BIT_ORDER:
            raise _fail(where, f"bit order {d['bit_order']!r} is not supported (only {BIT_ORDER!r})")
        counts = {}
        for name, c in (d["counts"].items() if isinstance(d["counts"], dict) else ()):
            c = _keys(c, _SPLIT_KEYS, f"{where}: counts.{name}")
            counts[name] = SplitCounts(**c)
        try:
            m = cls(grid=d["grid"], bits_per_token=d["bits_per_token"], subtoken_bits=d["subtoken_bits"],
                    classes=d["classes"], resolution=d["resolution"], views=d["views"], tokenizer=d["tokenizer"],
                    counts=counts, created=d["created"], updated=d["updated"], code_version=d["code_version"],
                    tokenizer_path=d["tokenizer_path"], commits=d.get("commits"))
        except ManifestError as e:  # name the file actually read
            msg = str(e)
            raise ManifestError(msg.replace(MANIFEST, where, 1) if msg.startswith(MANIFEST) else f"{where}: {msg}") \
                from None
        if Packing.from_dict(d["packing"], where) != m.packing:
            raise _fail(where, f"packing {d['packing']['bits']} bits x {d['packing']['tokens_per_image']} tokens does "
                               f"not match bits_per_token {m.bits_per_token} and grid {list(m.grid)}")
        derived = {"tokens_per_image": m.tokens_per_image, "num_classes": m.num_classes, "failures": m.failures,
                   "stores": stores(m.packing)}
        for key, want in derived.items():
            if d[key] != want:
                raise _fail(where, f"{key} is {d[key]!r}, the rest of the manifest gives {want!r}")
        return m


_MANIFEST_KEYS = ("format", "version", "packing", "bits_per_token", "bit_order", "subtoken_bits", "grid",
                  "tokens_per_image", "num_classes", "classes", "resolution", "views", "tokenizer", "counts",
                  "failures", "stores", "created", "updated", "code_version", "tokenizer_path")


# --- commits and checksums --------------------------------------------------------------------------------
# The manifest's ``commits`` block records what each split committed, so that a reader opens exactly that
# and a verifier can tell damage from data:
#   {"lance_version": int | null,            the Lance version readers open (null: no row in any split)
#    "lance_files": {name: sha256},          the data files (under tokens.lance/data/) of that version
#    "splits": {split: {"mds_index_sha256":  sha256 of mds/<split>/index.json (null until the split is complete)
#                       "chunks": [{"chunk", "first", "images", "rows", "rows_sha256", "paths_sha256",
#                                   "mds_index_sha256"}]}}}
# A chunk holds images [first, first + images) and ``rows`` rows. ``rows_sha256`` covers the fields both
# stores hold (id, label, view, tokens), so one digest checks Lance and MDS; ``paths_sha256`` covers
# Lance's path column; ``mds_index_sha256`` is the chunk's own MDS index, which carries the shards' sha1.

_CHUNK_KEYS = {"chunk", "first", "images", "rows", "rows_sha256", "paths_sha256", "mds_index_sha256"}


def _sha(v: Any, where: str, nullable: bool = False) -> None:
    if not ((nullable and v is None) or (isinstance(v, str) and _SHA256.match(v))):
        raise _fail(where, f"must be 64 hex digits{' or null' if nullable else ''}, got {v!r}")


def check_commits(commits: Any, counts: Mapping[str, SplitCounts], where: str = MANIFEST) -> None:
    """Validate a ``commits`` block against the counts it must add up to (ManifestError otherwise)."""
    c = _keys(commits, {"lance_version", "lance_files", "splits"}, f"{where}: commits")
    if c["lance_version"] is not None:
        _int(c["lance_version"], f"{where}: commits.lance_version", 1)
    elif any(cnt.rows for cnt in counts.values()):
        raise _fail(where, "commits.lance_version is null, but the counts hold rows")
    if not isinstance(c["lance_files"], dict):
        raise _fail(where, "commits.lance_files must be an object {file: sha256}")
    for name, digest in c["lance_files"].items():
        _sha(digest, f"{where}: commits.lance_files[{name!r}]")
    splits = c["splits"] if isinstance(c["splits"], dict) else None
    if splits is None or set(splits) != set(counts):
        raise _fail(where, f"commits.splits must name the splits of counts {sorted(counts)}, got "
                           f"{sorted(splits) if splits is not None else c['splits']!r}")
    for name, rec in splits.items():
        at = f"{where}: commits.splits.{name}"
        rec = _keys(rec, {"mds_index_sha256", "chunks"}, at)
        _sha(rec["mds_index_sha256"], f"{at}.mds_index_sha256", nullable=not counts[name].complete)
        if not isinstance(rec["chunks"], list):
            raise _fail(at, "chunks must be a list")
        seen, spans = set(), []
        for ch in rec["chunks"]:
            ch = _keys(ch, _CHUNK_KEYS, f"{at}.chunks[]")
            for k in ("chunk", "first", "images", "rows"):
                _int(ch[k], f"{at}.chunks[].{k}", 1 if k == "images" else 0)
            for k in ("rows_sha256", "paths_sha256", "mds_index_sha256"):
                _sha(ch[k], f"{at}.chunks[{ch['chunk']}].{k}")
            if ch["chunk"] in seen:
                raise _fail(at, f"chunk {ch['chunk']} is listed twice")
            seen.add(ch["chunk"])
            spans.append((ch["first"], ch["first"] + ch["images"]))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise _fail(at, "chunks overlap")
        images = sum(ch["images"] for ch in rec["chunks"])
        rows = sum(ch["rows"] for ch in rec["chunks"])
        cnt = counts[name]
        if images != cnt.encoded_images + cnt.failed_images or rows != cnt.rows:
            raise _fail(at, f"chunks hold {images} images and {rows} rows, counts say "
                            f"{cnt.encoded_images + cnt.failed_images} and {cnt.rows}")


def parse_row_id(rid: str) -> Tuple[str, int, int]:
    """(split, index, view) of a ``row_id``."""
    split, index, view = rid.rsplit("-", 2)
    return split, int(index), int(view)


def row_digest(rid: str, label: int, view: int, tokens: bytes) -> bytes:
    """sha256 of one row's fields common to both stores (tokens last: the encoding is unambiguous)."""
    return hashlib.sha256(f"{rid}\t{int(label)}\t{int(view)}\t".encode() + bytes(tokens)).digest()


def path_digest(rid: str, path: str) -> bytes:
    return hashlib.sha256(f"{rid}\t{path}".encode()).digest()


def chunk_digest(rows: Mapping[str, bytes]) -> str:
    """A chunk's digest from {row id: row or path digest}: rows taken in (index, view) order."""
    return hashlib.sha256(b"".join(d for _, d in sorted(rows.items(), key=lambda kv: parse_row_id(kv[0])[1:]))
                          ).hexdigest()


def chunk_record(chunk: int, first: int, images: int, rows: Sequence[Mapping[str, Any]],
                 mds_dir: PathOrUri) -> Dict[str, Any]:
    """The ``commits`` entry of a chunk whose ``rows`` were just written to MDS (``mds_dir``) and Lance."""
    return {"chunk": chunk, "first": first, "images": images, "rows": len(rows),
            "rows_sha256": chunk_digest({r["id"]: row_digest(r["id"], r["label"], r["view"], r["tokens"])
                                         for r in rows}),
            "paths_sha256": chunk_digest({r["id"]: path_digest(r["id"], r["path"]) for r in rows}),
            "mds_index_sha256": sha256_file(Path(mds_dir) / "index.json")}


def lance_data_files(root: PathOrUri, version: Optional[int]) -> Dict[str, str]:
    """{data file name: sha256} of the files a Lance version reads (its fragments' data files)."""
    if version is None:
        return {}
    import lance

    ds = lance.dataset(lance_uri(root), version=version)
    names = sorted(f.path for frag in ds.get_fragments() for f in frag.data_files())
    return {n: sha256_file(Path(lance_uri(root), "data", n)) for n in names}


def commits_block(root: PathOrUri, lance_version: Optional[int], splits: Mapping[str, Mapping[str, Any]],
                  lance_files: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The manifest's ``commits`` (``lance_files`` are hashed from disk unless given)."""
    files = lance_files if lance_files is not None else lance_data_files(root, lance_version)
    return {"lance_version": lance_version, "lance_files": dict(sorted(files.items())),
            "splits": {k: {"mds_index_sha256": v["mds_index_sha256"],
                           "chunks": sorted(v["chunks"], key=lambda c: c["chunk"])} for k, v in sorted(splits.items())}}


def is_remote(uri: PathOrUri) -> bool:
    return "://" in str(uri)


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


# --- writers ----------------------------------------------------------------------------------------------

def mds_split_dir(root: PathOrUri, split: str) -> Path:
    return Path(root) / MDS_DIR / split


def chunk_dir_name(chunk: int) -> str:
    return f"chunk-{chunk:05d}"


def mds_samples(rows: Sequence[Mapping[str, Any]], num_views: int) -> List[Dict[str, Any]]:
    """(image, view) rows {id, label, view, tokens} -> one MDS sample per image, in image order.

    Every image must come with each of its ``num_views`` views exactly once, all with one label.
    """
    by_image: Dict[Tuple[str, int], Dict[int, Mapping[str, Any]]] = {}
    for r in rows:
        split, index, view = parse_row_id(r["id"])
        if not 0 <= int(r["view"]) < num_views or int(r["view"]) != view:
            raise ValueError(f"row {r['id']}: view {r['view']} is not one of the {num_views} views")
        views = by_image.setdefault((split, index), {})
        if view in views:
            raise ValueError(f"row {r['id']} is given twice")
        views[view] = r
    out = []
    for (split, index), views in sorted(by_image.items(), key=lambda kv: kv[0][1]):
        if len(views) != num_views or len({int(r["label"]) for r in views.values()}) != 1:
            raise ValueError(f"image {image_id(split, index)}: needs {num_views} views with one label, got "
                             f"views {sorted(views)}")
        out.append({"id": image_id(split, index), "label": int(views[0]["label"]),
                    "tokens": b"".join(bytes(views[v]["tokens"]) for v in range(num_views))})
    return out


def mds_rows(sample: Mapping[str, Any], bytes_per_image: int) -> List[Tuple[str, int, int, bytes]]:
    """An MDS sample -> its (row id, label, view, packed tokens) rows, as the Lance table holds them."""
    data = bytes(sample["tokens"])
    if not data or len(data) % bytes_per_image:
        raise ValueError(f"sample {sample['id']}: {len(data)} token bytes are not a whole number of "
                         f"{bytes_per_image}-byte views")
    split, index = parse_image_id(sample["id"])
    return [(row_id(split, index, v), int(sample["label"]), v, data[v * bytes_per_image:(v + 1) * bytes_per_image])
            for v in range(len(data) // bytes_per_image)]


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


def dataset_uri(root: PathOrUri, *parts: str) -> str:
    """A path inside a dataset, local or remote."""
    return object_store.join(str(root), *parts) if is_remote(root) else str(Path(root, *parts))


def lance_uri(root: PathOrUri) -> str:
    return dataset_uri(root, LANCE_DIR)


def open_lance(root: PathOrUri, version: Optional[int]):
    """The dataset's Lance table at ``version`` (None: the latest), on local disk or object storage."""
    import lance

    opts = object_store.lance_options() if object_store.is_s3(root) else None
    return lance.dataset(lance_uri(root), version=version, storage_options=opts)


def append_lance(root: PathOrUri, table) -> int:
    """Append (or create) the Lance table; returns the new version."""
    import lance

    uri = lance_uri(root)
    mode = "append" if Path(uri, "_versions").is_dir() else "create"
    return lance.write_dataset(table, uri, mode=mode, data_storage_version=LANCE_FORMAT).version


def provenance_of(manifest: Manifest) -> Dict[str, Any]:
    """The settings a producer without its own (a synthetic dataset) records in the Lance metadata."""
    return {"format": FORMAT, "version": VERSION, "tokenizer": manifest.tokenizer, "resolution": manifest.resolution,
            "views": list(manifest.views), "grid": list(manifest.grid), "bits_per_token": manifest.bits_per_token,
            "bit_order": BIT_ORDER, "subtoken_bits": list(manifest.subtoken_bits), "classes": list(manifest.classes)}


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
    schema = lance_schema(packing, provenance_of(manifest))
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


# ---------------------------------------------------------------------------------------------- tokenizer identity
# Which tokenizer checkpoint decodes a dataset's tokens: Stage 2 records it in its checkpoints and checks the
# tokenizer it decodes samples with (only comparing bit counts let a different tokenizer decode garbage).


def tokens_record(manifest: Manifest) -> Dict[str, Any]:
    """What a model trained on ``manifest``'s tokens keeps about them (``stage2_ar.train`` stores it as its
    checkpoints' ``extra["tokens"]``), so the tokenizer decoding its samples can be checked later."""
    tok = manifest.tokenizer
    return {"tokenizer_sha256": tok["checkpoint_sha256"], "tokenizer_preset": tok["preset"],
            "tokenizer_path": manifest.tokenizer_path, "grid": list(manifest.grid), "resolution": manifest.resolution}


def check_tokenizer(record: Mapping[str, Any], tokenizer_dir: PathOrUri, *, downsample_factor: Optional[int] = None,
                    allow: Optional[str] = None) -> None:
    """Refuse (ManifestError) a tokenizer checkpoint that is not the one the tokens of ``record``
    (``tokens_record``) were encoded with: the sha256 of its weights must be the recorded one, and its
    ``downsample_factor`` (if given) must turn the recorded resolution into the recorded grid. ``allow`` names
    the caller's switch for a deliberate swap, if it has one."""
    problems = []
    want = record.get("tokenizer_sha256")
    have = checkpoint_sha256(tokenizer_dir)
    if want and have != want:
        where = f" at {record['tokenizer_path']}" if record.get("tokenizer_path") else ""
        problems.append(f"its weights (sha256 {have[:12]}...) are not those the tokens were encoded with (sha256 "
                        f"{want[:12]}..., preset {record.get('tokenizer_preset')!r}{where})")
    res, grid = record.get("resolution"), record.get("grid")
    if downsample_factor and res and grid and [res // downsample_factor] * 2 != list(grid):
        problems.append(f"its {downsample_factor}x downsampling gives a {res // downsample_factor}x"
                        f"{res // downsample_factor} grid at {res} px, the tokens are {grid[0]}x{grid[1]}")
    if problems:
        swap = f" (pass {allow} to use it anyway)" if allow else ""
        raise ManifestError(f"tokenizer {tokenizer_dir} does not match the token dataset: {'; '.join(problems)}; "
                            f"it would decode the tokens into wrong images{swap}")


# --- Streaming's shared memory ----------------------------------------------------------------------------

def clean_stale_streaming_shm(shm_dir: PathOrUri = "/dev/shm", local_dirs: Sequence[PathOrUri] = ()) -> List[str]:
    """Remove Streaming shared-memory segments left by killed readers; returns the names removed.

    Streaming names its segments ``<prefix:06d>_<name>`` and leaves them behind when a reader is killed
    with its resource tracker; a restarted reader with the same local cache directory then fails
    ("Reused local directory"). Streaming's own ``clean_stale_shared_memory`` unlinks every segment it
    finds, also those of other jobs running on the node. Here only this user's segments are considered,
    and a prefix goes only when
      * no process maps any of its segments or holds one open (read from /proc; a Python process of
        ours whose maps cannot be read could, so then this rule removes nothing), or
      * it was registered for one of ``local_dirs`` (this job's own cache directories, which no other
        live job can use: Streaming refuses that). Live readers keep the segments of every lower
        prefix mapped (Streaming's prefix search never lets go of them), so only this rule frees a
        killed run's segments while other jobs read. Call it before this job creates any dataset.
    """
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN

    base = Path(shm_dir)
    pattern = re.compile(r"(\d{6})_(" + "|".join(map(re.escape, SHM_TO_CLEAN)) + r")")
    try:
        ours = [p for p in base.iterdir() if pattern.fullmatch(p.name) and p.stat().st_uid == os.geteuid()]
    except OSError:  # no such directory (not Linux), or unreadable
        return []
    prefixes = {pattern.fullmatch(p.name).group(1) for p in ours}
    mine = {os.path.abspath(d) for d in local_dirs}
    stale = {pre for pre in prefixes if mine and _registered_under(base / f"{pre}_{LOCALS}", mine)}
    used = _shm_in_use(base) if prefixes - stale else set()
    if used is not None:
        busy = {n.split("_")[0] for n in used}
        stale |= prefixes - busy
    removed = []
    for p in ours:
        if p.name.split("_")[0] in stale:
            try:
                p.unlink()
                removed.append(p.name)
            except FileNotFoundError:  # its owner's exit handler got there first
                pass
    return sorted(removed)


def _registered_under(locals_file: Path, dirs: set) -> bool:
    """Whether a Streaming ``locals`` segment (int32 size, then its local dirs joined by NUL, then the
    prefix) names a directory in or under one of ``dirs``."""
    try:
        data = locals_file.read_bytes()
        size = int(np.frombuffer(data[:4], np.int32)[0])
        registered = data[4:size].decode("utf-8").split("\0")[:-1]
    except (OSError, ValueError, IndexError):
        return False
    return any(r == d or r.startswith(d.rstrip("/") + "/") for r in registered for d in dirs)


def _shm_in_use(base: Path) -> Optional[set]:
    """Names under ``base`` that some process maps or has open; None when that cannot be told."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").is_file():
        return None
    prefixes, used = {f"{base}/", f"{base.resolve()}/"}, set()
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            targets = [line.split(maxsplit=5)[-1] for line in (pid / "maps").read_text().splitlines()]
            fds = list((pid / "fd").iterdir())
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        except PermissionError:
            if _may_use_streaming(pid):
                return None
            continue  # another user's process (it cannot open our 0600 segments), or not Python at all
        for fd in fds:
            try:
                targets.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                pass
        for t in targets:
            for prefix in prefixes:
                if t.startswith(prefix):
                    used.add(t[len(prefix):].split(" ")[0])
    return used


def _may_use_streaming(pid: Path) -> bool:
    """Whether a process whose maps we may not read could hold our segments: a Python process of ours."""
    try:
        argv0 = (pid / "cmdline").read_bytes().split(b"\0")[0]
        return pid.stat().st_uid == os.geteuid() and b"python" in os.path.basename(argv0)
    except OSError:
        return False
