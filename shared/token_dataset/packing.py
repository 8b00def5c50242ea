"""How token indices become bytes: the ``Packing`` of one (image, view) row, and the regrouping of such
rows into MDS samples (one per image, its views' rows concatenated) and back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from shared.token_dataset.layout import (PACKING_CODEC, PACKING_ORDER, ManifestError, check_int, check_keys, fail,
                                         image_id, parse_image_id, parse_row_id, row_id)

# The packing codec is shared.tokens, imported when first used: it imports torch, which the Ray decode
# tasks (they import this package through dataprep.pipeline for row ids) and the job's argument checks
# should not pay for.
_MAX_BITS = 31  # shared.tokens.MAX_BITS; checked against it in tests
Bytes = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Packing:
    """How one row's ``tokens`` bytes hold its raster-order indices (the codec of ``shared.tokens``)."""

    bits: int
    tokens_per_image: int

    def __post_init__(self):
        if check_int(self.bits, "packing: bits", 1) > _MAX_BITS:
            raise ManifestError(f"packing: bits must be an integer in [1, {_MAX_BITS}], got {self.bits}")
        check_int(self.tokens_per_image, "packing: tokens_per_image", 1)

    @property
    def bytes_per_image(self) -> int:
        return (self.tokens_per_image * self.bits + 7) // 8  # shared.tokens.packed_nbytes, without torch

    def encode(self, tokens: Any) -> bytes:
        from shared.tokens import pack_tokens

        flat = np.asarray(tokens).reshape(-1)
        if flat.size != self.tokens_per_image:
            raise ValueError(f"a row holds {self.tokens_per_image} tokens, got {flat.size}")
        return pack_tokens(flat, self.bits).tobytes()

    def decode(self, data: Union[Bytes, np.ndarray]) -> np.ndarray:
        """(tokens_per_image,) int64 indices of one row."""
        from shared.tokens import unpack_tokens

        return unpack_tokens(data, self.tokens_per_image, self.bits)

    def view(self, sample_tokens: Bytes, view: int) -> bytes:
        """One view's packed row out of an MDS sample's ``tokens`` (its views' rows concatenated)."""
        n = self.bytes_per_image
        return bytes(sample_tokens[view * n:(view + 1) * n])

    def decode_views(self, sample_tokens: Bytes, views: int) -> np.ndarray:
        """(views, tokens_per_image) int64 indices of an MDS sample's ``tokens``."""
        if len(sample_tokens) != views * self.bytes_per_image:
            raise ValueError(f"an image of {views} views holds {views * self.bytes_per_image} token bytes, got "
                             f"{len(sample_tokens)}")
        return np.stack([self.decode(self.view(sample_tokens, v)) for v in range(views)])

    def to_dict(self) -> Dict[str, Any]:
        return {"codec": PACKING_CODEC, "bits": self.bits, "tokens_per_image": self.tokens_per_image,
                "bytes_per_image": self.bytes_per_image, "order": PACKING_ORDER}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Packing":
        d = check_keys(d, {"codec", "bits", "tokens_per_image", "bytes_per_image", "order"}, f"{where}: packing")
        if d["codec"] != PACKING_CODEC or d["order"] != PACKING_ORDER:
            raise fail(where, f"packing codec {d['codec']!r} is not {PACKING_CODEC!r} in the documented order")
        try:
            p = cls(d["bits"], d["tokens_per_image"])
        except ManifestError as e:
            raise fail(where, str(e)) from None
        if d["bytes_per_image"] != p.bytes_per_image:
            raise fail(where, f"packing.bytes_per_image is {d['bytes_per_image']!r}, {p.tokens_per_image} tokens "
                              f"of {p.bits} bits take {p.bytes_per_image}")
        return p


# --- (image, view) rows <-> MDS samples -------------------------------------------------------------------

def mds_samples(rows: Sequence[Mapping[str, Any]], num_views: int) -> List[Dict[str, Any]]:
    """(image, view) rows {id, label, view, tokens} -> one MDS sample per image, in image order.

    Every image must come with each of its ``num_views`` views exactly once, all with one label.
    """
    by_image: Dict[Tuple[str, int], Dict[int, Mapping[str, Any]]] = {}
    for r in rows:
        split, index, view = parse_row_id(r["id"])
        if not 0 <= int(r["view"]) < num_views or int(r["view"]) != view:
            raise ValueError(f"row {r['id']}: view {r['view']} is not one of the {num_views} views")
        views = by_image.setdefault((split, index), {})
        if view in views:
            raise ValueError(f"row {r['id']} is given twice")
        views[view] = r
    out = []
    for (split, index), views in sorted(by_image.items(), key=lambda kv: kv[0][1]):
        if len(views) != num_views or len({int(r["label"]) for r in views.values()}) != 1:
            raise ValueError(f"image {image_id(split, index)}: needs {num_views} views with one label, got "
                             f"views {sorted(views)}")
        out.append({"id": image_id(split, index), "label": int(views[0]["label"]),
                    "tokens": b"".join(bytes(views[v]["tokens"]) for v in range(num_views))})
    return out


def mds_rows(sample: Mapping[str, Any], bytes_per_image: int) -> List[Tuple[str, int, int, bytes]]:
    """An MDS sample -> its (row id, label, view, packed tokens) rows, as the Lance table holds them."""
    data = bytes(sample["tokens"])
    if not data or len(data) % bytes_per_image:
        raise ValueError(f"sample {sample['id']}: {len(data)} token bytes are not a whole number of "
                         f"{bytes_per_image}-byte views")
    split, index = parse_image_id(sample["id"])
    return [(row_id(split, index, v), int(sample["label"]), v, data[v * bytes_per_image:(v + 1) * bytes_per_image])
            for v in range(len(data) // bytes_per_image)]
