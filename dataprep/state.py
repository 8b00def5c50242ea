"""The committed-chunks record, provenance checks, and the manifest they add up to.

``DATASET/state.json`` is the single source of truth for what is committed. It is rewritten atomically
*after* a chunk's MDS directory and Lance append are on disk, so after a crash anything it does not list
(a stray MDS chunk directory, a Lance version newer than the recorded one) is debris and is removed
before work resumes: every image ends up in the dataset exactly once.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional

from shared import atomic
from shared import token_dataset as td
from shared.token_dataset import checksums
from shared.token_dataset.manifest import now_iso
from shared.token_dataset.provenance import code_version

STATE = "state.json"
LOCK = ".lock"


class ProvenanceError(RuntimeError):
    """The dataset on disk was made with other settings than the ones asked for."""


class LockedError(RuntimeError):
    """Another job is writing the dataset."""


def diff_settings(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """Keys whose values differ, dotted, for a readable refusal."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class State:
    """state.json: {"settings": {...}, "lance_version": int|None, "splits": {name: {...}}}."""

    def __init__(self, root: Path, data: Dict[str, Any]):
        self.root, self.data = root, data

    @classmethod
    def load(cls, root: str | Path) -> Optional["State"]:
        f = Path(root) / STATE
        if not f.is_file():
            return None
        try:
            data = json.loads(f.read_text())
            ok = isinstance(data, dict) and isinstance(data.get("settings"), dict) and \
                isinstance(data.get("splits"), dict) and "lance_version" in data
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            raise ProvenanceError(f"{f} is damaged ({type(e).__name__}: {e}); the dataset cannot be resumed") from None
        if not ok:
            raise ProvenanceError(f"{f} is not a dataprep state record; the dataset cannot be resumed")
        return cls(Path(root), data)

    @classmethod
    def new(cls, root: str | Path, settings: Dict[str, Any]) -> "State":
        return cls(Path(root), {"format": td.FORMAT, "version": td.VERSION, "settings": settings,
                                "lance_version": None, "splits": {}})

    def save(self) -> None:
        atomic.write_text(self.root / STATE, json.dumps(self.data, indent=1, sort_keys=True) + "\n")

    @property
    def settings(self) -> Dict[str, Any]:
        return self.data["settings"]

    @property
    def lance_version(self) -> Optional[int]:
        return self.data["lance_version"]

    def check_settings(self, settings: Dict[str, Any]) -> None:
        diffs = diff_settings(self.settings, settings)
        if diffs:
            raise ProvenanceError(f"{self.root} was made with other settings ({'; '.join(diffs)}); "
                                  "use a new --out directory")

    def split(self, name: str) -> Optional[Dict[str, Any]]:
        return self.data["splits"].get(name)

    def start_split(self, name: str, run: Dict[str, Any]) -> Dict[str, Any]:
        """Register a split's run settings (in memory: the job saves once it is sure to run), or check
        them against the ones recorded."""
        rec = self.split(name)
        if rec is None:
            rec = self.data["splits"][name] = {"run": run, "chunks": {}, "complete": False}
        else:
            diffs = diff_settings(rec["run"], run)
            if diffs:
                raise ProvenanceError(f"split {name!r} of {self.root} was started with other inputs or "
                                      f"settings ({'; '.join(diffs)}); use a new --out directory")
        return rec

    def commit_chunk(self, split: str, chunk: int, info: Dict[str, Any], lance_version: int) -> None:
        self.data["splits"][split]["chunks"][str(chunk)] = info
        self.data["lance_version"] = lance_version
        self.save()

    def committed(self, split: str) -> Dict[int, Dict[str, Any]]:
        rec = self.split(split) or {"chunks": {}}
        return {int(k): v for k, v in rec["chunks"].items()}


class Lock:
    """One writer per dataset directory: an exclusive ``flock`` on DATASET/.lock, held for the whole job.

    The kernel drops the lock when its process dies however it dies, so a killed job never leaves a stale
    lock behind; the file holds the holder's pid and host for the refusal message.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self.fd: Optional[int] = None

    def __enter__(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise LockedError(f"{self.path.parent} is being written by another job ({holder}); wait for it "
                                  f"to finish or use another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)  # while still holding it, so nobody locks a file that goes away
        os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> str:
    """What the lock file's holder wrote about itself (empty for an instant after it took the lock)."""
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a job that is just starting"


def writer_of(root: Path) -> Optional[str]:
    """Who holds the dataset's writer lock ("pid N on host H"), or None when no job is writing it."""
    path = Path(root) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken only while nobody holds it exclusively
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def remove_leftovers(root: Path) -> List[Path]:
    """Remove the half-written files a job killed mid-write left in its dataset (``shared.atomic``'s
    ``.NAME.XXXXXXXX.tmp``: of state.json, manifest.json, failures-<split>.tsv, mds/<split>/index.json);
    only in a directory that holds a dataprep state record (the job's own), under its writer lock."""
    root = Path(root)
    gone = atomic.leftovers(root)
    mds = root / td.MDS_DIR
    for split_dir in sorted(mds.iterdir()) if mds.is_dir() else []:
        gone += atomic.leftovers(split_dir)
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def commits_of(state: State) -> Optional[Dict[str, Any]]:
    """The manifest's ``commits`` block from the chunk records (None for a dataset whose chunks were
    committed before records existed: it has no checksums). Lance data files are hashed once per version."""
    splits = {}
    for name, rec in state.data["splits"].items():
        chunks = list(state.committed(name).values())
        if any("commit" not in info for info in chunks):
            return None
        splits[name] = {"mds_index_sha256": rec.get("mds_index_sha256") if rec["complete"] else None,
                        "chunks": [info["commit"] for info in chunks]}
    files = state.data.get("lance_files") or {}
    if "files" not in files or files.get("version") != state.lance_version:  # none yet: no row reached Lance
        files = {"version": state.lance_version, "files": checksums.lance_data_files(state.root, state.lance_version)}
        state.data["lance_files"] = files
        state.save()
    return checksums.commits_block(state.root, state.lance_version, splits, files["files"])


def manifest_of(state: State) -> td.Manifest:
    """The manifest of the settings plus per-split counts derived from the committed chunks."""
    counts: Dict[str, td.SplitCounts] = {}
    for name, rec in sorted(state.data["splits"].items()):
        chunks = state.committed(name).values()
        per_class: Dict[str, int] = {}
        for info in chunks:
            for k, v in info["per_class"].items():
                per_class[k] = per_class.get(k, 0) + v
        counts[name] = td.SplitCounts(
            images=rec["run"]["num_images"], encoded_images=sum(info["encoded"] for info in chunks),
            failed_images=sum(len(info["failures"]) for info in chunks), rows=sum(info["rows"] for info in chunks),
            per_class=per_class, complete=rec["complete"])
    return td.Manifest.from_settings(
        state.settings, counts=counts, created=state.data.get("created") or now_iso(),
        code_version=state.data.get("code_version") or code_version(),
        tokenizer_path=state.data.get("tokenizer_path"),  # a hint for inspect_dataset's decoded grid
        commits=commits_of(state),
        sources={name: rec["source"] for name, rec in sorted(state.data["splits"].items()) if rec.get("source")}
        or None)  # where each split's images came from (dataprep.sources); absent for older datasets
