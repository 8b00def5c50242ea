"""Which files count as images when a folder is scanned (the tokenizer's loader and dataprep's listing)."""
from __future__ import annotations

from pathlib import PurePath
from typing import Union

# Lower-case suffixes; anything else (READMEs, .DS_Store, label files) is skipped, not counted as a failure.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(name: Union[str, PurePath]) -> bool:
    """True for a file name with an image suffix (any case) that is not hidden (dot files)."""
    p = PurePath(name)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
