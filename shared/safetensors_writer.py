"""Write a safetensors file tensor by tensor, reporting the bytes written (a released AR-XL file is GBs).

``safetensors.torch.save_file`` writes the whole file in one call, so a long save shows nothing. The format is
small enough to write directly: an 8-byte little-endian header length, a JSON header (``"__metadata__"``: str ->
str, then ``name: {"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative to the end of the
header) padded with spaces to a multiple of 8, then every tensor's bytes back to back in header order, laid
out in safetensors' own order (``_LAYOUT``, then by name). Reading stays with the safetensors library, which
validates all of the above.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import torch

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.complex64: "C64",
}
# safetensors' own layout order (its dtype enum, last first): widest elements first, so every tensor starts at a
# multiple of its element size behind the 8-byte-aligned header
_LAYOUT = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
           "I8", "U8", "BOOL")
_PIECE = 64 << 20  # bytes per write: progress moves within a large tensor too


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """The size of the tensors' data (the file is this plus a header of a few kB)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_safetensors(path: Union[str, Path], tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None,
                      tick: Callable[[int], None] = lambda n: None) -> None:
    """Write ``tensors`` (CPU, contiguous, no shared storage: ``shared.checkpoint`` prepares them) to ``path``;
    ``tick(n)`` after each ``n`` bytes of tensor data."""
    if sys.byteorder != "little":
        raise ValueError("writing safetensors on a big-endian machine is not supported")
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not a contiguous CPU tensor")
    order = sorted(tensors, key=lambda k: (_LAYOUT.index(DTYPE_CODES[tensors[k].dtype]), k))
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name]
            if not t.numel():
                continue
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            for start in range(0, len(data), _PIECE):
                piece = data[start:start + _PIECE]
                f.write(piece)
                tick(len(piece))
