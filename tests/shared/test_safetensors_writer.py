"""shared.safetensors_writer: files the safetensors library reads back bit for bit, written piece by piece."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared import safetensors_writer as sw


def _every_dtype():
    g = torch.Generator().manual_seed(0)
    ints = lambda dt: torch.arange(-3, 4).to(dt) if dt.is_signed else torch.arange(7).to(dt)
    return {
        "w.f32": torch.randn(3, 5, generator=g), "w.f64": torch.randn(2, generator=g, dtype=torch.float64),
        "w.bf16": torch.randn(7, generator=g).bfloat16(), "w.f16": torch.randn(2, 3, generator=g).half(),
        "w.f8e4": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "w.f8e5": torch.randn(3, generator=g).to(torch.float8_e5m2),
        "w.c64": torch.randn(2, generator=g, dtype=torch.complex64),
        **{f"n.{dt}".replace("torch.", ""): ints(dt) for dt in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                                 torch.uint8, torch.uint16, torch.uint32, torch.uint64)},
        "flag": torch.tensor(True), "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
    }


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def _header(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), len(raw)


def test_every_dtype_reads_back_bit_for_bit_with_metadata(tmp_path):
    sd = _every_dtype()
    assert {t.dtype for t in sd.values()} == set(sw.DTYPE_CODES)  # every code is exercised
    ticks = []
    sw.write_safetensors(tmp_path / "ours.safetensors", sd, metadata={"kind": "x", "n": 3}, tick=ticks.append)
    back = load_file(tmp_path / "ours.safetensors")
    assert sorted(back) == sorted(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(_bits(back[k]), _bits(t)), k
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"kind": "x", "n": "3"}
    assert sum(ticks) == sw.tensor_bytes(sd)


def test_layout_is_the_libraries_own(tmp_path):
    """Same header entries, offsets and file size as ``safetensors.save_file``; each tensor aligned to its width."""
    sd = _every_dtype()
    save_file(sd, tmp_path / "ref.safetensors", metadata={"kind": "x"})
    sw.write_safetensors(tmp_path / "ours.safetensors", sd, metadata={"kind": "x"})
    (n_ref, ref, size_ref), (n, ours, size) = _header(tmp_path / "ref.safetensors"), _header(tmp_path / "ours.safetensors")
    assert (n, ours, size) == (n_ref, ref, size_ref)
    assert n % 8 == 0
    for k, t in sd.items():
        assert ours[k]["data_offsets"][0] % t.element_size() == 0, k


def test_large_tensors_are_written_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sw, "_PIECE", 1000)
    t = torch.arange(1200, dtype=torch.float32)  # 4800 bytes: 5 pieces
    ticks = []
    sw.write_safetensors(tmp_path / "a.safetensors", {"t": t}, tick=ticks.append)
    assert ticks == [1000] * 4 + [800]
    assert torch.equal(load_file(tmp_path / "a.safetensors")["t"], t)


@pytest.mark.parametrize("bad, message", [
    ({"t": torch.zeros(4, 4).t()}, "not a contiguous CPU tensor"),
    ({"t": torch.zeros(2, dtype=torch.complex128)}, "has no safetensors code"),
])
def test_refuses_what_it_cannot_write_before_creating_the_file(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        sw.write_safetensors(tmp_path / "a.safetensors", bad)
    assert not (tmp_path / "a.safetensors").exists()
