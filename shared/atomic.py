"""Atomic file and directory writes: a reader sees the old content or the new one, never a torn file.

Outputs are checked before any work (``check_output_dir``): a tool never replaces or deletes something it
did not make. ``atomic_dir`` replaces an existing directory only when it is empty or its caller recognises
it as its own product (``replace_if``), and checks again at the rename.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


class OutputError(ValueError):
    """An output path a tool must not or cannot write: a file where a directory goes, a directory that is
    not writable, or one that holds someone else's files (one-line message)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(mode: int) -> int:
    """The permissions ``open``/``mkdir`` would give a new file or directory of ``mode`` (0o666 / 0o777)."""
    return mode & ~_umask()


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
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
