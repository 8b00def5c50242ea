"""Parquet shards: Hugging Face's image datasets (imagenet-1k: an ``image`` struct column of ``bytes`` and
``path``, an integer ``label`` column, class names in the ``huggingface`` schema metadata).

A record is a row; its id within the source is ``SHARD#ROW`` (the row's position in its file, from 0). The
listing reads each file's footer only (row counts and schema); a read task streams the rows it was given
one row group at a time, reading the image bytes and label columns and nothing else.
"""
from __future__ import annotations

import json
from typing import Any, BinaryIO, Dict, Iterator, List, Optional

from dataprep.sources.records import Inspection, Outcome, SourceError, check_label

IMAGE_COLUMN, LABEL_COLUMN = "image", "label"


def _image_leaf(schema, column: str) -> str:
    """The column (or struct field) that holds the encoded image bytes."""
    import pyarrow as pa

    field = schema.field(column)
    if pa.types.is_struct(field.type):
        names = [field.type.field(i).name for i in range(field.type.num_fields)]
        if "bytes" not in names:
            raise SourceError(f"column {column!r} is a struct without a 'bytes' field (it has {', '.join(names)})")
        return f"{column}.bytes"
    if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
        return column
    raise SourceError(f"column {column!r} holds {field.type}, not image bytes (binary, or a struct with 'bytes')")


def check_schema(schema, image: str, label: str) -> None:
    """One line for a file these columns cannot be read from (a wrong dataset or wrong column options)."""
    import pyarrow as pa

    names = schema.names
    for column, option in ((image, "--image-column"), (label, "--label-column")):
        if column not in names:
            raise SourceError(f"has no column {column!r} (its columns: {', '.join(names)}); give {option}")
    _image_leaf(schema, image)
    if not pa.types.is_integer(schema.field(label).type):
        raise SourceError(f"column {label!r} holds {schema.field(label).type}, not integer labels")


def class_names(schema, label: str) -> Optional[List[str]]:
    """The label column's class names from Hugging Face's schema metadata (a ClassLabel feature), if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label]
        names = feature.get("names")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


class ParquetFormat:
    name = "parquet"

    def __init__(self, options: Dict[str, Any]):
        self.image = options.get("image_column") or IMAGE_COLUMN
        self.label = options.get("label_column") or LABEL_COLUMN

    def options(self) -> Dict[str, Any]:
        return {"image_column": self.image, "label_column": self.label}

    def inspect(self, f: BinaryIO) -> Inspection:
        """Rows and class names (Hugging Face metadata) from the footer; SourceError for a file without the
        columns; any other exception: the file cannot be read (recorded as a failure)."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        check_schema(pf.schema_arrow, self.image, self.label)
        return Inspection(pf.metadata.num_rows, class_names(pf.schema_arrow, self.label))

    def fallback_path(self, name: str, position: int) -> str:
        return f"{name}#{position}"

    def read(self, f: BinaryIO, name: str, start: int, stop: int, num_classes: int) -> Iterator[Outcome]:
        """Rows [start, stop) in order, one outcome each, one row group in memory at a time."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        leaf = _image_leaf(pf.schema_arrow, self.image)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                try:
                    table = pf.read_row_group(g, columns=[leaf, self.label])
                except (OSError, ValueError, RuntimeError) as e:  # pyarrow's errors of damaged pages
                    if type(e).__name__ == "StoreError":
                        raise
                    reason = f"corrupt Parquet row group {g}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    for r in range(lo, hi):
                        yield Outcome(f"{name}#{r}", -1, None, reason)
                else:
                    col = table.column(self.image).combine_chunks()
                    data = col.field("bytes") if leaf != self.image else col
                    labels = table.column(self.label).to_pylist()
                    for r in range(lo, hi):
                        blob = data[r - first].as_py()
                        label, reason = check_label(labels[r - first], num_classes)
                        if not reason and blob is None:
                            reason = "no image bytes (null)"
                        yield Outcome(f"{name}#{r}", label, blob if not reason else None, reason)
            first += n
            if first >= stop:
                return
