"""What a format reader gives for each record, and the label checks every format shares."""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple


class SourceError(ValueError):
    """A source that cannot be encoded as given (a missing column, tars without labels, no images): one line,
    before Ray starts."""


class Inspection(NamedTuple):
    """What the listing learns from one shard: its records, the class names it carries (or None), members
    ignored, damage that ends it early (or None: one failure named after the shard), whether any record has
    a label."""

    records: int
    names: Optional[List[str]] = None
    ignored: int = 0
    error: Optional[str] = None
    labelled: bool = True


class Outcome(NamedTuple):
    """One record of a shard: its id within the source, its label, its encoded image bytes, or why it
    cannot be used (then ``data`` is None and ``label`` may be -1)."""

    path: str
    label: int
    data: Optional[bytes]
    reason: str = ""


def check_label(value: Any, num_classes: int) -> Tuple[int, str]:
    """(label, '') for an integer in 0..num_classes-1, else (-1, reason)."""
    if value is None:
        return -1, "label missing"
    if isinstance(value, bool) or not isinstance(value, int):
        return -1, f"label {value!r} is not an integer"
    if not 0 <= value < num_classes:
        return -1, f"label {value} out of range 0..{num_classes - 1}"
    return value, ""
