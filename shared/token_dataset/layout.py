"""What a token dataset's parts are called and where they are: the format's names and constants, row and
image ids, split names, the dataset's paths (local or remote), and the one error type of the contract with
the small checks its validators share."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from shared import object_store

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

# Lance column types by name; "tokens" is fixed_size_binary[bytes_per_image] (see the package doc).
LANCE_COLUMNS = {"id": "string", "split": "string", "path": "string", "label": "int32", "view": "int8",
                 "tokens": "fixed_size_binary"}
LANCE_FORMAT = "2.1"
MDS_COLUMNS = {"id": "str", "label": "int", "tokens": "bytes"}  # one image: see the package doc
MDS_COMPRESSION = "zstd"
MDS_HASH = "sha1"  # Streaming records it for every shard file in index.json; verification recomputes it
# Small records (~600 B) shuffle well only when shards are small: Streaming shuffles shard by shard,
# so 4 MiB shards (~7k records) give a 2.5M-row ImageNet dataset several hundred shards to mix.
MDS_SHARD_BYTES = 1 << 22

_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # used in paths and Lance filters (fullmatch)
PathOrUri = Union[str, os.PathLike]


class ManifestError(ValueError):
    """A token dataset that is missing, malformed, of another format or version, or that does not fit."""


# --- ids --------------------------------------------------------------------------------------------------

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


def parse_row_id(rid: str) -> Tuple[str, int, int]:
    """(split, index, view) of a ``row_id``."""
    split, index, view = rid.rsplit("-", 2)
    return split, int(index), int(view)


# --- paths ------------------------------------------------------------------------------------------------

def is_remote(uri: PathOrUri) -> bool:
    return "://" in str(uri)


def dataset_uri(root: PathOrUri, *parts: str) -> str:
    """A path inside a dataset, local or remote."""
    return object_store.join(str(root), *parts) if is_remote(root) else str(Path(root, *parts))


def lance_uri(root: PathOrUri) -> str:
    return dataset_uri(root, LANCE_DIR)


def mds_split_dir(root: PathOrUri, split: str) -> Path:
    return Path(root) / MDS_DIR / split


def chunk_dir_name(chunk: int) -> str:
    return f"chunk-{chunk:05d}"


# --- the checks the manifest and packing validators share ------------------------------------------------

def fail(where: str, what: str) -> ManifestError:
    return ManifestError(f"{where}: {what}")


def check_keys(d: Any, want: set, where: str) -> Dict[str, Any]:
    """``d`` as a JSON object with exactly the keys ``want``."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing, extra = sorted(want - set(d)), sorted(set(d) - want)
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [f"unknown {', '.join(extra)}"] if extra else []
    if problems:
        raise ManifestError(f"{where}: {'; '.join(problems)}")
    return d


def check_int(v: Any, where: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ManifestError(f"{where} must be an integer >= {low}, got {v!r}")
    return v
