"""The committed-chunks record, provenance checks and the dataset manifest.json.

``DATASET/state.json`` is the single source of truth for what is committed. It is rewritten atomically
*after* a chunk's MDS directory and Lance append are on disk, so after a crash anything it does not list
(a stray MDS chunk directory, a Lance version newer than the recorded one) is debris and is removed
before work resumes: every image ends up in the dataset exactly once.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from shared import atomic

FORMAT = "open-magvit2-tokens"
VERSION = 1
STATE = "state.json"
MANIFEST = "manifest.json"
LOCK = ".lock"


class ProvenanceError(RuntimeError):
    """The dataset on disk was made with other settings than the ones asked for."""


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (read from files, no subprocess)."""
    from importlib import metadata

    try:
        version = metadata.version("open-magvit2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = git / head[5:]
            head = ref.read_text().strip() if ref.is_file() else head[5:]
        return f"{version}+{head[:12]}"
    except OSError:
        return version


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
        return cls(Path(root), json.loads(f.read_text())) if f.is_file() else None

    @classmethod
    def new(cls, root: str | Path, settings: Dict[str, Any]) -> "State":
        return cls(Path(root), {"format": FORMAT, "version": VERSION, "settings": settings,
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
        """Register a split's run settings, or check them against the ones recorded."""
        rec = self.split(name)
        if rec is None:
            rec = self.data["splits"][name] = {"run": run, "chunks": {}, "complete": False}
            self.save()
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
    """One writer per dataset directory: an O_EXCL lock file holding the pid, stale locks taken over."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                    os.kill(pid, 0)
                    alive = pid != os.getpid()
                except (ValueError, ProcessLookupError, OSError):
                    alive = False
                if alive:
                    raise ProvenanceError(f"{self.path.parent} is being written by process {pid}")
                self.path.unlink(missing_ok=True)  # left behind by a killed run
        raise ProvenanceError(f"cannot lock {self.path.parent}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(root: Path, state: State, extra: Dict[str, Any]) -> Dict[str, Any]:
    """manifest.json from the settings plus per-split counts derived from the committed chunks."""
    s = state.settings
    counts: Dict[str, Any] = {}
    failures = 0
    for name, rec in sorted(state.data["splits"].items()):
        chunks = state.committed(name)
        per_class: Dict[str, int] = {}
        for info in chunks.values():
            for k, v in info["per_class"].items():
                per_class[k] = per_class.get(k, 0) + v
        n_fail = sum(len(info["failures"]) for info in chunks.values())
        failures += n_fail
        counts[name] = {
            "images": rec["run"]["num_images"],
            "encoded_images": sum(info["encoded"] for info in chunks.values()),
            "failed_images": n_fail,
            "rows": sum(info["rows"] for info in chunks.values()),
            "per_class": dict(sorted(per_class.items(), key=lambda kv: int(kv[0]))),
            "complete": rec["complete"],
        }
    manifest = {
        "format": FORMAT, "version": VERSION,
        "bits_per_token": s["bits_per_token"], "bit_order": s["bit_order"], "subtoken_bits": s["subtoken_bits"],
        "grid": s["grid"], "tokens_per_image": s["grid"][0] * s["grid"][1],
        "num_classes": len(s["classes"]), "classes": s["classes"],
        "resolution": s["resolution"], "views": s["views"], "tokenizer": s["tokenizer"],
        "counts": counts, "failures": failures,
        "created": state.data.get("created") or now_iso(), "updated": now_iso(),
        "code_version": code_version(),
        "tokenizer_path": state.data.get("tokenizer_path"),  # a hint for inspect's decoded grid
        **extra,
    }
    atomic.write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest
