"""Atomic file and directory writes: a reader sees the old content or the new one, never a torn file.

Outputs are checked before any work (``check_output_dir``): a tool never replaces or deletes something it
did not make. ``atomic_dir`` replaces an existing directory only when it is empty or its caller recognises
it as its own product (``replace_if``), and checks again at the rename.

A full disk is reported as such, once, here: whatever fills it while writing through ``atomic_path`` /
``atomic_dir`` (or inside ``disk_full_as_error``) becomes a one-line ``DiskFullError`` naming the path, and
the temporary file or directory is removed, so nothing is left looking complete.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

PathLike = Union[str, os.PathLike]


class OutputError(ValueError):
    """An output path a tool must not or cannot write: a file where a directory goes, a directory that is
    not writable, or one that holds someone else's files (one-line message)."""


class DiskFullError(OSError, OutputError):
    """No space left on device while writing ``filename`` (an OSError with errno ENOSPC, and an
    OutputError, so every handler of either reports it in one line)."""

    def __init__(self, path: PathLike):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: no space left on device (free some space and run the same command again)"


# What full disks look like when the write does not come from Python's own I/O: Rust (Lance) and C++
# (torch.save's zip writer, which only sees a short write: "unexpected pos N vs M") report it in text.
_FULL_TEXTS = ("no space left on device", "os error 28", "unexpected pos ", "file write failed")


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return True
    return any(t in str(e).lower() for t in _FULL_TEXTS)


@contextlib.contextmanager
def disk_full_as_error(path: PathLike) -> Iterator[None]:
    """Turn a full disk met inside the block into ``DiskFullError(path)``; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # safetensors and Lance raise their own types, with the OS error in the text
        if is_disk_full(e):
            raise DiskFullError(path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(mode: int) -> int:
    """The permissions ``open``/``mkdir`` would give a new file or directory of ``mode`` (0o666 / 0o777)."""
    return mode & ~_umask()


_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, umask_mode(0o666))  # mkstemp makes 0600; give the file the permissions open() would
    tmp = Path(tmp)
    try:
        with disk_full_as_error(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def leftovers(directory: PathLike) -> List[Path]:
    """The temporary files ``atomic_path`` left in ``directory`` when its process was killed mid-write:
    ``.NAME.XXXXXXXX.tmp`` (the name of the file it was writing, eight random characters); a job that owns the
    directory removes them when it starts."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _LEFTOVER.match(p.name) and p.is_file() and not p.is_symlink())


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _check_writable(where: Path, target: Path) -> None:
    """``where`` (or, while it does not exist, its nearest existing ancestor) must be a writable directory."""
    base = where
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"cannot write {target}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: {base} is not writable")


def _not_ours(path: Path, what: str, verb: str = "replace") -> OutputError:
    return OutputError(f"{path} already exists and is not {what}: refusing to {verb} it "
                       f"(choose another path, or pass --overwrite)")


def check_output_dir(path: PathLike, *, owned: Callable[[Path], bool], what: str = "this tool's output",
                     replaced: bool = True) -> Path:
    """Refuse, before any work, an output directory that cannot be written or that holds someone else's files.

    A file where the directory goes is always refused. An existing non-empty directory is accepted only if
    ``owned(path)`` says it is the tool's own product (``what`` names that product in the message).
    ``replaced``: the directory is swapped whole (``atomic_dir``: a link there would be replaced too, and the
    parent must be writable) rather than written into (then the directory itself must be writable).
    """
    path = Path(path)
    if (replaced and path.is_symlink()) or (os.path.lexists(path) and not path.is_dir()):
        raise OutputError(f"{path} exists and is not a directory: refusing to replace it")
    if path.is_dir():
        try:
            busy = any(path.iterdir())
        except OSError as e:
            raise OutputError(f"cannot read {path}: {e.strerror}") from None
        if busy and not owned(path):
            raise _not_ours(path, what, "replace" if replaced else "write into")
    _check_writable(path.parent if replaced or not path.is_dir() else path, path)
    return path


def check_output_file(path: PathLike, *, owned: Callable[[Path], bool], what: str = "this tool's output") -> Path:
    """Refuse, before any work, an output file that cannot be written (atomically: its directory must be
    writable) or whose existing content ``owned(path)`` does not recognise as the tool's own product."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory: give the path of a file")
    if os.path.lexists(path) and not owned(path):
        raise _not_ours(path, what)
    _check_writable(path.parent, path)
    return path


def _never(path: Path) -> bool:
    return False


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, replace_if: Optional[Callable[[Path], bool]] = None,
               what: str = "this tool's output") -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` in one rename.

    An existing ``path`` is replaced only if it is an empty directory or ``replace_if(path)`` is true (see
    ``check_output_dir``; checked on entry and again before the rename). It is moved aside first and removed
    after the new one is in place, so at every instant either the complete old or the complete new
    directory sits at ``path``.
    """
    path = Path(path)
    owned = replace_if or _never
    check_output_dir(path, owned=owned, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, umask_mode(0o777))
    try:
        with disk_full_as_error(path):
            yield tmp
        old = None
        if os.path.lexists(path):
            check_output_dir(path, owned=owned, what=what)  # something may have appeared during the work
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
