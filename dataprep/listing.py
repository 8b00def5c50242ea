"""The input listing: which images a split holds, their labels, and how they are cut into chunks.

Two sources:
  * an ImageNet-style root: ROOT/<split>/<class>/<file>; label = index of the class folder in the sorted
    list of class folders (the official data code does the same with synsets);
  * a file list: one ``path<TAB>label`` per line, paths relative to --data (or absolute).

The listing is sorted, so image ``index`` (its position) is stable for a given set of files; the dataset
records a hash of the listing and refuses to resume over a different one.

A file whose name is not valid UTF-8 (legal on POSIX file systems, not storable in the datasets' string
columns) stays in the listing under a readable form of its name (undecodable bytes as ``\\xNN``) with a
reason, and ends up in the failures table instead of stopping the job.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

from shared.image_files import is_image_file


class ListingError(ValueError):
    """An input folder or file list that cannot be listed (missing split, malformed line)."""


NOT_UTF8 = "file name is not valid UTF-8"


@dataclass(frozen=True)
class Item:
    index: int  # position in the sorted listing of the split
    path: str  # relative to the data root (posix separators); see readable_name
    label: int
    reason: str = ""  # why the file cannot be used, when the listing already knows (NOT_UTF8)


def readable_name(name: str) -> Tuple[str, str]:
    """(a UTF-8 form of a file name from os.listdir, reason it is unusable or ''): a name that is not
    UTF-8 comes back with its undecodable bytes written as \\xNN."""
    try:
        name.encode("utf-8")
        return name, ""
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace"), NOT_UTF8


@dataclass(frozen=True)
class Listing:
    items: List[Item]
    classes: List[str]
    ignored: int  # non-image files skipped by the folder scanner

    @property
    def num_images(self) -> int:
        return len(self.items)

    def sha256(self) -> str:
        """Hash of (path, label) in order: equal listings give equal hashes."""
        h = hashlib.sha256()
        for it in self.items:
            line = f"{it.path}\t{it.label}" + (f"\t{it.reason}" if it.reason else "")  # as before for usable files
            h.update(f"{line}\n".encode("utf-8"))
        return h.hexdigest()


def scan_folder(root: str | Path, split: str) -> Listing:
    """List ROOT/<split>/<class>/* images; classes are the sorted class folder names."""
    base = Path(root) / split
    if not base.is_dir():
        raise ListingError(f"no split folder {base}")
    # Sorted by the names' bytes: the code-point order for UTF-8 names, and defined for the others too.
    folders = sorted((p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")), key=os.fsencode)
    if not folders:
        raise ListingError(f"{base} has no class folders (expected {split}/<class>/<image>)")
    rows, ignored = [], 0
    def unreadable(e: OSError):  # os.walk would skip the folder, and its images, without a word
        raise ListingError(f"cannot list {e.filename}: {e.strerror}")

    for label, name in enumerate(folders):
        for dirpath, dirnames, files in os.walk(base / name, onerror=unreadable):
            dirnames.sort(key=os.fsencode)
            for f in sorted(files, key=os.fsencode):
                if not is_image_file(f):
                    ignored += 1
                    continue
                rel = Path(dirpath, f).relative_to(root).as_posix()
                rows.append((os.fsencode(rel), *readable_name(rel), label))
    rows.sort()
    items = [Item(i, path, label, reason) for i, (_, path, reason, label) in enumerate(rows)]
    return Listing(items, [readable_name(n)[0] for n in folders], ignored)


def read_file_list(list_path: str | Path) -> Listing:
    """Parse ``path<TAB>label`` lines (blank lines and '#' comments skipped). Classes are '0'..'N-1'."""
    data = Path(list_path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ListingError(f"{list_path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); a file list must be "
                           "UTF-8") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise ListingError(f"{list_path}:{n}: expected 'path<TAB>label', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise ListingError(f"{list_path}:{n}: label {parts[1]!r} is not an integer") from None
        if label < 0:
            raise ListingError(f"{list_path}:{n}: negative label {label}")
        rows.append((Path(parts[0]).as_posix(), label))
    if not rows:
        raise ListingError(f"{list_path} lists no images")
    rows.sort()
    if len({p for p, _ in rows}) != len(rows):
        raise ListingError(f"{list_path} lists a path more than once")
    n_classes = max(l for _, l in rows) + 1
    return Listing([Item(i, p, l) for i, (p, l) in enumerate(rows)], [str(c) for c in range(n_classes)], 0)


def resolve(root: str | Path | None, rel: str) -> str:
    """Absolute path of a listed file."""
    return rel if os.path.isabs(rel) or root is None else os.path.join(str(root), rel)


def chunk_ranges(n: int, chunk_size: int) -> List[Tuple[int, int]]:
    """[start, stop) image ranges of the commit units."""
    if chunk_size < 1:
        raise ListingError(f"chunk size must be positive, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def groups(items: Sequence[Item], batch_size: int) -> List[List[Item]]:
    """Consecutive runs of ``batch_size`` images: one tokenizer forward pass each.

    Float results of a conv net change in the last bits with the batch it runs in, and an 18-bit token
    is a sign pattern, so batch composition is fixed by position (never by scheduling) to keep tokens
    identical between runs, resumes and machines of one kind.
    """
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]

