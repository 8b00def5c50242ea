"""The input manifest: which images a split holds, their labels, and how they are cut into chunks.

Two sources:
  * an ImageNet-style root: ROOT/<split>/<class>/<file>; label = index of the class folder in the sorted
    list of class folders (the official data code does the same with synsets);
  * a file list: one ``path<TAB>label`` per line, paths relative to --data (or absolute).

The listing is sorted, so image ``index`` (its position) is stable for a given set of files; the dataset
records a hash of the listing and refuses to resume over a different one.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

# Extensions the folder scanner lists; other files (READMEs, .DS_Store) are ignored, not failures.
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    index: int  # position in the sorted listing of the split
    path: str  # relative to the data root (posix separators)
    label: int


@dataclass(frozen=True)
class Listing:
    items: List[Item]
    classes: List[str]
    ignored: int  # non-image files skipped by the folder scanner

    def sha256(self) -> str:
        """Hash of (path, label) in order: equal listings give equal hashes."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.path}\t{it.label}\n".encode("utf-8"))
        return h.hexdigest()


def scan_folder(root: str | Path, split: str) -> Listing:
    """List ROOT/<split>/<class>/* images; classes are the sorted class folder names."""
    base = Path(root) / split
    if not base.is_dir():
        raise ManifestError(f"no split folder {base}")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ManifestError(f"{base} has no class folders (expected {split}/<class>/<image>)")
    rows, ignored = [], 0
    for label, name in enumerate(classes):
        for dirpath, dirnames, files in os.walk(base / name):
            dirnames.sort()
            for f in sorted(files):
                if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_EXTS:
                    ignored += 1
                    continue
                rel = Path(dirpath, f).relative_to(root).as_posix()
                rows.append((rel, label))
    rows.sort()
    return Listing([Item(i, p, l) for i, (p, l) in enumerate(rows)], classes, ignored)


def read_file_list(list_path: str | Path) -> Listing:
    """Parse ``path<TAB>label`` lines (blank lines and '#' comments skipped). Classes are '0'..'N-1'."""
    rows = []
    for n, line in enumerate(Path(list_path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise ManifestError(f"{list_path}:{n}: expected 'path<TAB>label', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise ManifestError(f"{list_path}:{n}: label {parts[1]!r} is not an integer") from None
        if label < 0:
            raise ManifestError(f"{list_path}:{n}: negative label {label}")
        rows.append((Path(parts[0]).as_posix(), label))
    if not rows:
        raise ManifestError(f"{list_path} lists no images")
    rows.sort()
    if len({p for p, _ in rows}) != len(rows):
        raise ManifestError(f"{list_path} lists a path more than once")
    n_classes = max(l for _, l in rows) + 1
    return Listing([Item(i, p, l) for i, (p, l) in enumerate(rows)], [str(c) for c in range(n_classes)], 0)


def resolve(root: str | Path | None, rel: str) -> str:
    """Absolute path of a listed file."""
    return rel if os.path.isabs(rel) or root is None else os.path.join(str(root), rel)


def chunk_ranges(n: int, chunk_size: int) -> List[Tuple[int, int]]:
    """[start, stop) image ranges of the commit units."""
    if chunk_size < 1:
        raise ManifestError(f"chunk size must be positive, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def groups(items: Sequence[Item], batch_size: int) -> List[List[Item]]:
    """Consecutive runs of ``batch_size`` images: one tokenizer forward pass each.

    Float results of a conv net change in the last bits with the batch it runs in, and an 18-bit token
    is a sign pattern, so batch composition is fixed by position (never by scheduling) to keep tokens
    identical between runs, resumes and machines of one kind.
    """
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def row_id(split: str, index: int, view: int) -> str:
    """Stable id of one (image, view) row: short and sequential, so it compresses to almost nothing."""
    return f"{split}-{index:08d}-{view}"
