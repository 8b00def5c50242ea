"""Model references: where a checkpoint comes from, resolved to a checkpoint directory of this project.

A reference (REF) is accepted wherever a tool or ``from_pretrained`` takes a model:

    runs/tok/final                        a checkpoint directory of ours (or a converter's OUT holding
                                          ar/ and tokenizer/: the one of the wanted kind is taken)
    imagenet_256_L.ckpt                   an official Lightning file, converted on first use
    hf://ORG/REPO[/FILE][@REVISION]       a file on the Hugging Face Hub, e.g.
                                          hf://TencentARC/Open-MAGVIT2-Tokenizer-256-resolution

Hub files are fetched by ``huggingface_hub.hf_hub_download`` into its standard cache, so HF_TOKEN,
HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE=1 work as everywhere else. Without FILE, the
released file name of an official repository (``OFFICIAL_RELEASES``) is used, else the repository's single
``.ckpt`` (listed by the Hub API, or in the local cache when offline). REVISION is a branch, tag or commit.

An official file is converted by the stage's converter (a ``Converter`` passed to ``resolve``: this module
imports nothing of the stages) and the result is cached, keyed by the file's sha256: beside the file in
``FILE.converted/<sha256>/<variant>/`` when that directory is writable, else (and always for Hub files) in
``$OPEN_MAGVIT2_CACHE`` (default ``$XDG_CACHE_HOME/open-magvit2``, i.e. ``~/.cache/open-magvit2``)
``/converted/<sha256>/<variant>/``. A conversion runs under a file lock, so processes started together
(torchrun) convert once.

``Resolved.record()`` is the provenance to store with a product (dataset manifest, run config, samples):
the reference as given, the source kind, the local path, the sha256 of the official file (of the weights
file for a checkpoint directory) and, for Hub files, repo, file, requested revision and resolved commit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional

from shared import atomic
from shared.checkpoint import WEIGHTS, CheckpointError, PathLike, error_line, is_checkpoint

HUB_SCHEME = "hf://"
CACHE_ENV = "OPEN_MAGVIT2_CACHE"
# The released files (TencentARC on the Hugging Face Hub): repository -> file
OFFICIAL_RELEASES: Dict[str, str] = {
    "TencentARC/Open-MAGVIT2-Tokenizer-128-resolution": "imagenet_128_L.ckpt",
    "TencentARC/Open-MAGVIT2-Tokenizer-256-resolution": "imagenet_256_L.ckpt",
    "TencentARC/Open-MAGVIT2-AR-B-256-resolution": "AR_256_B.ckpt",
    "TencentARC/Open-MAGVIT2-AR-L-256-resolution": "AR_256_L.ckpt",
    "TencentARC/Open-MAGVIT2-AR-XL-256-resolution": "AR_256_XL.ckpt",
}
_MEMO_MIN_BYTES = 64 << 20  # files this large keep their sha256 in the cache's memo (hashing 6 GB takes a while)
_SHA = re.compile(r"^[0-9a-f]{40}$")

# (official file, its cache directory, its provenance record) -> writes one or more <cache dir>/<variant>
Converter = Callable[[Path, Path, Dict[str, Any]], None]


class ModelRefError(CheckpointError):
    """A reference that cannot be resolved: malformed, missing, or refused by the Hub (one-line message)."""


@dataclasses.dataclass(frozen=True)
class HubRef:
    repo: str
    filename: Optional[str] = None
    revision: Optional[str] = None

    def __str__(self) -> str:
        text = HUB_SCHEME + self.repo + (f"/{self.filename}" if self.filename else "")
        return text + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(text: Any) -> bool:
    return isinstance(text, str) and text.startswith(HUB_SCHEME)


def parse_hub_ref(text: str) -> HubRef:
    """``hf://ORG/REPO[/FILE][@REVISION]`` -> HubRef (FILE may contain folders)."""
    body, at, revision = text[len(HUB_SCHEME):].partition("@")
    parts = body.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or (at and not revision):
        raise ModelRefError(f"malformed Hub reference {text!r}: expected hf://ORG/REPO[/FILE][@REVISION]")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def cache_home() -> Path:
    """``$OPEN_MAGVIT2_CACHE``, else ``$XDG_CACHE_HOME/open-magvit2``, else ``~/.cache/open-magvit2``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "open-magvit2"


# ------------------------------------------------------------------------------------------------ sha256


def _memo_file() -> Path:
    return cache_home() / "sha256.json"


def _read_memo() -> Dict[str, List[Any]]:
    try:
        memo = json.loads(_memo_file().read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def sha256_of(path: PathLike) -> str:
    """sha256 of a file; a large file's digest is remembered by (real path, size, mtime) in the cache."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns]
    big = st.st_size >= _MEMO_MIN_BYTES
    if big:
        known = _read_memo().get(real)
        if isinstance(known, list) and known[:2] == stamp and len(known) == 3:
            return known[2]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if big:
        with contextlib.suppress(OSError):  # a memo that cannot be written only costs time
            memo = _read_memo()
            memo[real] = stamp + [digest]
            atomic.write_text(_memo_file(), json.dumps(memo, indent=1, sort_keys=True) + "\n")
    return digest


# ------------------------------------------------------------------------------------------------ sources


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a model came from: a checkpoint directory, an official file, or a Hub file (in the HF cache)."""

    ref: str
    kind: str  # "directory" | "file" | "hub"
    path: Path
    sha256: Optional[str]
    repo: Optional[str] = None
    filename: Optional[str] = None
    revision: Optional[str] = None
    commit: Optional[str] = None

    def record(self) -> Dict[str, Any]:
        out = {"ref": self.ref, "source": self.kind, "path": str(self.path), "sha256": self.sha256}
        if self.kind == "hub":
            out.update(repo=self.repo, file=self.filename, revision=self.revision, commit=self.commit)
        return out


def _hub_message(e: BaseException, ref: HubRef, filename: Optional[str]) -> str:
    """One line for a huggingface_hub failure: what was refused and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{ref} ({constants.ENDPOINT})"
    chain, seen = [], e
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    status = next((c.response.status_code for c in chain
                   if isinstance(c, HfHubHTTPError) and getattr(c, "response", None) is not None), None)
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    if isinstance(e, GatedRepoError):
        return f"{where}: a gated repository: accept its terms on the Hub, then set HF_TOKEN ({token})"
    if status == 401 and not isinstance(e, RepositoryNotFoundError):
        return f"{where}: authentication failed (HTTP 401): the token is not accepted ({token}); check HF_TOKEN"
    if status == 403:
        return f"{where}: access denied (HTTP 403): the token has no access to {ref.repo} ({token})"
    if isinstance(e, RepositoryNotFoundError):
        return f"{where}: repository {ref.repo} not found (or private: set HF_TOKEN; {token})"
    if isinstance(e, RevisionNotFoundError):
        return f"{where}: revision {ref.revision!r} not found in {ref.repo}"
    if isinstance(e, LocalEntryNotFoundError) or any(isinstance(c, OfflineModeIsEnabled) for c in chain):
        if constants.HF_HUB_OFFLINE:
            return (f"{where}: {filename or 'the file list'} is not in the Hugging Face cache "
                    f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it")
        return f"{where}: cannot reach the Hub and {filename or 'the file'} is not cached ({error_line(chain[-1])})"
    if isinstance(e, EntryNotFoundError):
        return f"{where}: no file {filename!r} in {ref.repo} at revision {ref.revision or 'main'}"
    return f"{where}: download failed ({error_line(e)})"


def _cached_ckpts(ref: HubRef) -> List[str]:
    """The .ckpt files of the cached snapshot of ``ref``'s revision (offline listing)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo, repo_type="model")
    revision = ref.revision or "main"
    commit = revision if _SHA.match(revision) else None
    if commit is None:
        with contextlib.suppress(OSError):
            commit = (storage / "refs" / revision).read_text().strip()
    snapshot = storage / "snapshots" / (commit or "")
    if not commit or not snapshot.is_dir():
        raise ModelRefError(f"{ref}: no file named and the Hub cannot be asked (offline), nor is a snapshot of "
                            f"{ref.repo}@{revision} in the cache ({constants.HF_HUB_CACHE}); name the file: "
                            f"hf://{ref.repo}/FILE")
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.ckpt"))


def _listed_ckpts(ref: HubRef) -> List[str]:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return _cached_ckpts(ref)
    info = HfApi().model_info(ref.repo, revision=ref.revision)
    return sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".ckpt"))


def _hub_filename(ref: HubRef) -> str:
    if ref.filename:
        return ref.filename
    if ref.repo in OFFICIAL_RELEASES:
        return OFFICIAL_RELEASES[ref.repo]
    try:
        files = _listed_ckpts(ref)
    except ModelRefError:
        raise
    except Exception as e:  # huggingface_hub's HTTP / offline errors
        raise ModelRefError(_hub_message(e, ref, None)) from None
    if len(files) != 1:
        found = f"{len(files)} .ckpt files ({', '.join(files[:5])})" if files else "no .ckpt file"
        raise ModelRefError(f"{ref}: {found}; name the file: hf://{ref.repo}/FILE")
    return files[0]


def fetch_hub_file(ref: HubRef) -> Source:
    """Download (or find in the HF cache) the file of a Hub reference."""
    from huggingface_hub import hf_hub_download

    filename = _hub_filename(ref)
    try:
        local = Path(hf_hub_download(ref.repo, filename, revision=ref.revision))
    except Exception as e:  # huggingface_hub's HTTP / offline / validation errors
        raise ModelRefError(_hub_message(e, ref, filename)) from None
    commit = local.parents[len(PurePosixPath(filename).parts) - 1].name  # .../snapshots/<commit>/<filename>
    return Source(ref=str(ref), kind="hub", path=local, sha256=sha256_of(local), repo=ref.repo, filename=filename,
                  revision=ref.revision, commit=commit)


def _weights_sha256(directory: Path) -> Optional[str]:
    """sha256 of a checkpoint directory's weights file (what dataset manifests record); None if unreadable
    (loading the checkpoint then says what is wrong)."""
    try:
        return sha256_of(directory / WEIGHTS)
    except OSError:
        return None


def locate(ref: PathLike) -> Source:
    """A reference -> its local source (Hub files are downloaded); sha256 of the file (of a directory's weights)."""
    text = str(ref)
    if is_hub_ref(text):
        return fetch_hub_file(parse_hub_ref(text))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise ModelRefError(f"unsupported reference {text!r}: give a local path or hf://ORG/REPO[/FILE][@REVISION]")
    path = Path(text).expanduser()
    if path.is_dir():
        return Source(ref=text, kind="directory", path=path, sha256=_weights_sha256(path))
    if not path.is_file():
        raise ModelRefError(f"no such file or directory: {text}")
    try:
        digest = sha256_of(path)
    except OSError as e:
        raise ModelRefError(f"cannot read {text}: {e.strerror or e}") from None
    return Source(ref=text, kind="file", path=path, sha256=digest)


# ------------------------------------------------------------------------------------------------ resolution


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A checkpoint directory of ours (``path``, what ``from_checkpoint`` reads) and where it came from."""

    path: Path
    source: Source
    converted: bool

    def record(self) -> Dict[str, Any]:
        return {**self.source.record(), "checkpoint": str(self.path), "converted": self.converted}


def conversion_dirs(source: Source) -> List[Path]:
    """Where the conversions of an official file are cached, in the order they are looked up."""
    assert source.sha256 is not None
    shared_cache = cache_home() / "converted" / source.sha256
    if source.kind == "file":
        return [source.path.parent / f"{source.path.name}.converted" / source.sha256, shared_cache]
    return [shared_cache]


def _writable(directory: Path) -> bool:
    base = directory
    while not base.exists() and base != base.parent:
        base = base.parent
    return base.is_dir() and os.access(base, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted(source: Source, *, kind: str, variant: str, convert: Converter) -> Path:
    """The cached conversion ``variant`` (a ``kind`` checkpoint) of an official file, made by ``convert`` once."""
    places = conversion_dirs(source)
    for root in places:
        if is_checkpoint(root / variant, kind):
            return root / variant
    root = next((p for p in places if _writable(p)), None)
    if root is None:
        raise ModelRefError(f"cannot cache the conversion of {source.ref}: none of {', '.join(map(str, places))} "
                            f"is writable (set {CACHE_ENV})")
    try:
        with _locked(root):
            if not is_checkpoint(root / variant, kind):  # another process may have made it meanwhile
                convert(source.path, root, source.record())
    except OSError as e:
        raise ModelRefError(f"cannot write the conversion of {source.ref} to {root}: {e.strerror or e}") from None
    if not is_checkpoint(root / variant, kind):
        raise ModelRefError(f"converting {source.ref} gave no {kind!r} checkpoint {variant!r}")
    return root / variant


def resolve(ref: PathLike, *, kind: str, variant: str, convert: Converter) -> Resolved:
    """A reference -> a ``kind`` checkpoint directory: a directory as it is (its ``kind`` sub-directory when it
    is a converter's OUT), an official file (local or Hub) through the cached conversion ``variant``."""
    source = locate(ref)
    if source.kind == "directory":
        path = source.path / kind if is_checkpoint(source.path / kind, kind) else source.path
        if path != source.path:
            source = dataclasses.replace(source, sha256=_weights_sha256(path))
        return Resolved(path, source, converted=False)
    return Resolved(converted(source, kind=kind, variant=variant, convert=convert), source, converted=True)


def official_file(ref: PathLike) -> Source:
    """A reference that must name an official file (the converters' input): a local file or a Hub file."""
    text = str(ref)
    if not is_hub_ref(text) and Path(text).expanduser().is_dir():
        raise ModelRefError(f"no such file: {text} is a directory; give an official .ckpt file or "
                            f"hf://ORG/REPO[/FILE][@REVISION]")
    return locate(text)
