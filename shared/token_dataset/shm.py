"""Streaming's shared memory: the segments killed readers leave behind, removed without touching those of
readers that still run."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from shared.token_dataset.layout import PathOrUri


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
