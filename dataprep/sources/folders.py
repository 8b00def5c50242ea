"""An image folder on S3: ``s3://BUCKET/PREFIX/<split>/<class>/<image>``, the layout of a local ``--data``
folder, listed through the object store.

The listing is the local one's (``dataprep.listing.scan_folder``): keys sorted by their bytes, class = the
first folder under the split, label = its position among the sorted class folders, non-image names ignored
(counted), hidden class folders skipped; so a folder and its copy on S3 give the same images the same ids
and tokens. The objects' sizes and ETags are hashed into the source record, so a rerun over objects that
changed is refused.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict

from dataprep.listing import Item, Listing, ListingError
from shared import object_store as store
from shared.image_files import is_image_file


@dataclass(frozen=True)
class FolderListing(Listing):
    """A folder listing with its source record."""

    source: Dict[str, Any] = field(default_factory=dict)


def scan_s3_folder(root: str, split: str) -> FolderListing:
    base = store.join(root, split)
    rows, classes, ignored, digest = [], set(), 0, hashlib.sha256()
    entries = sorted(store.list_entries(base), key=lambda e: e[0].encode())
    for key, size, etag in entries:
        cls, sep, rest = key.partition("/")
        if not sep or not rest or cls.startswith(".") or key.endswith("/"):
            if sep and not cls.startswith("."):
                classes.add(cls)  # a folder marker still makes a class folder, as an empty local folder does
            continue
        classes.add(cls)
        if not is_image_file(rest.rsplit("/", 1)[-1]):
            ignored += 1
            continue
        rows.append((f"{split}/{key}", cls))
        digest.update(f"{key}\t{size}\t{etag}\n".encode())
    if not classes:
        raise ListingError(f"{store.redact(base)}/ holds no class folders (expected {split}/<class>/<image>)")
    if not rows:
        raise ListingError(f"{store.redact(base)}/ holds no images ({ignored} other objects)")
    names = sorted(classes, key=lambda c: c.encode())
    label = {c: i for i, c in enumerate(names)}
    items = [Item(i, path, label[cls]) for i, (path, cls) in enumerate(rows)]
    source = {"uri": store.redact(root), "format": "folder", "objects": len(rows), "objects_sha256": digest.hexdigest()}
    return FolderListing(items, names, ignored, source)
