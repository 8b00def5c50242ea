"""shared.legacy_checkpoint: every Lightning / torch.save file gives its tensors exactly, and no file runs code.

The extra entries a Lightning file carries (numpy values, an OmegaConf DictConfig, an argparse Namespace, an
object of a class that is not installed) load as inert records; the weights must be tensors, and anything
else there is refused in one line naming the globals. Payloads (``os.system`` through REDUCE, code in a
class's ``__setstate__``, a module that runs code when imported) are never run, wherever they sit.
"""
import argparse
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import legacy_checkpoint as lc
from shared.checkpoint import CheckpointError, load_legacy
from stage1_tokenizer import convert_official as tok_convert
from stage1_tokenizer.tokenizer import Tokenizer

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "official" / "golden"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden_sd():
    return torch.load(GOLDEN / "tokenizer_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _same_tensors(got, want):
    assert got.keys() == want.keys()
    for k, v in want.items():
        g = got[k]
        assert type(g) is torch.Tensor, k
        assert g.dtype == v.dtype and g.shape == v.shape and g.stride() == v.stride(), k
        assert torch.equal(g, v.detach()), k


# --------------------------------------------------------------------------------------- the extra entries


class _NotInstalled:
    """Stands for a class of a package the reader does not have: pickled under a module that then vanishes."""

    def __init__(self):
        self.payload = {"a": 1}


def _extras():
    from omegaconf import OmegaConf

    return {
        "numpy_scalar": {"lr": np.float64(1e-4), "step": np.int64(7)},
        "numpy_array": {"mean": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "dictconfig": {"cfg": OmegaConf.create({"model": {"ch": 32, "mult": [1, 2]}, "lr": 1e-4})},
        "namespace": {"args": argparse.Namespace(lr=1e-4, gpus=8)},
        "missing_class": {"callback": _NotInstalled()},
    }


def _save_with_missing_module(obj, path):
    """torch.save ``obj`` with _NotInstalled living in a module that exists only during the save."""
    parent, fake = types.ModuleType("not_installed_pkg"), types.ModuleType("not_installed_pkg.callbacks")
    parent.callbacks, fake._NotInstalled = fake, _NotInstalled
    old = (_NotInstalled.__module__, _NotInstalled.__qualname__)
    _NotInstalled.__module__, _NotInstalled.__qualname__ = fake.__name__, "_NotInstalled"
    sys.modules.update({parent.__name__: parent, fake.__name__: fake})
    try:
        torch.save(obj, path)
    finally:
        del sys.modules[fake.__name__], sys.modules[parent.__name__]
        _NotInstalled.__module__, _NotInstalled.__qualname__ = old


@pytest.mark.parametrize("kind", ["numpy_scalar", "numpy_array", "dictconfig", "namespace", "missing_class"])
def test_lightning_extras_load_and_the_weights_come_out_exactly(golden_sd, tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    _save_with_missing_module({"state_dict": golden_sd, "hyper_parameters": _extras()[kind], "epoch": 3,
                               "callbacks": {"ModelCheckpoint": {"best": torch.tensor(0.5)}}}, path)
    if kind != "numpy_array":  # torch's weights-only loader refuses them (the reason for this module)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    obj = lc.load(path)
    assert obj["epoch"] == 3 and torch.equal(obj["callbacks"]["ModelCheckpoint"]["best"], torch.tensor(0.5))
    extra = next(iter(obj["hyper_parameters"].values()))
    assert isinstance(extra, lc.Opaque) and lc.global_of(extra)
    _same_tensors(lc.load_state_dict(path), golden_sd)
    if kind == "missing_class":
        assert lc.global_of(extra) == "not_installed_pkg.callbacks._NotInstalled"
        assert extra.state == {"payload": {"a": 1}} and "not_installed_pkg" not in sys.modules


def test_the_issue_example_converts(golden_sd, tmp_path, capsys):
    """{'state_dict': sd, 'hyper_parameters': {'lr': numpy.float64(1e-4)}} used to exit 1."""
    torch.save({"state_dict": golden_sd, "hyper_parameters": {"lr": np.float64(1e-4)}}, tmp_path / "lit.ckpt")
    torch.save({"state_dict": golden_sd}, tmp_path / "bare.ckpt")
    tok_convert.main([str(tmp_path / "lit.ckpt"), str(tmp_path / "a")])
    tok_convert.main([str(tmp_path / "bare.ckpt"), str(tmp_path / "b")])
    a, b = Tokenizer.from_checkpoint(tmp_path / "a"), Tokenizer.from_checkpoint(tmp_path / "b")
    _same_tensors(a.state_dict(), b.state_dict())


# --------------------------------------------------------------------------------------- formats


def _odd_tensors():
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    return {"view": base[1:, ::2], "transposed": base.t(), "base": base, "bf16": torch.randn(3, dtype=torch.bfloat16),
            "bool": torch.tensor([True, False]), "complex": torch.randn(2, dtype=torch.complex64),
            "scalar": torch.tensor(3, dtype=torch.int32), "empty": torch.zeros(0, 3), "half": torch.randn(2, 2).half(),
            "param": torch.nn.Parameter(torch.ones(2)), "int64": torch.arange(5)}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "stream"])
def test_both_torch_formats_give_what_torch_load_gives(tmp_path, zip_format):
    sd = _odd_tensors()
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": sd, "meta": {"ns": argparse.Namespace(a=1)}}, path,
               _use_new_zipfile_serialization=zip_format)
    got = lc.load_state_dict(path)
    _same_tensors(got, torch.load(path, weights_only=False)["state_dict"])
    # storage sharing survives, as with torch.load
    assert got["view"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
    if zip_format:
        sd16 = {"u16": torch.tensor([1, 2, 65535], dtype=torch.uint16)}  # written through _rebuild_tensor_v3
        torch.save(sd16, tmp_path / "u16.pt")
        _same_tensors(lc.load_state_dict(tmp_path / "u16.pt"), sd16)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "stream"])
def test_reading_reports_the_tensor_bytes_with_an_eta(tmp_path, zip_format, capsys, monkeypatch):
    """``show_progress``: in a log, lines over the storages' bytes (each counted once) ending at 100 %."""
    monkeypatch.setenv("PROGRESS_MODE", "lines")
    monkeypatch.setenv("PROGRESS_INTERVAL", "0")  # a line for every chunk read
    monkeypatch.setattr(lc, "_CHUNK", 64)
    sd = _odd_tensors()
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=zip_format)
    lc.load_state_dict(path)
    assert capsys.readouterr().err == ""  # silent unless asked
    got = lc.load_state_dict(path, show_progress=True)
    _same_tensors(got, sd)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in sd.values()}
    total = sum(storages.values())
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 3 and all(line.startswith("reading odd.pt: ") for line in lines) and "ETA" in lines[0]
    assert lines[-1].startswith(f"reading odd.pt: {total}/{total} (100%) B done in")


def test_big_endian_byteorder_record(tmp_path):
    """A file written on a big-endian machine: byteorder 'big' and every storage byte-swapped."""
    sd = {"f": torch.randn(3, 2), "i": torch.arange(4, dtype=torch.int32), "c": torch.randn(2, dtype=torch.complex128),
          "b": torch.tensor([1, 2], dtype=torch.uint8)}
    torch.save(sd, tmp_path / "le.pt")  # storages are numbered in the order torch.save meets them: sd's order
    widths = [t.element_size() // (2 if t.is_complex() else 1) for t in sd.values()]
    with zipfile.ZipFile(tmp_path / "le.pt") as src, zipfile.ZipFile(tmp_path / "be.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                width = widths[int(info.filename.rsplit("/", 1)[1])]
                data = np.frombuffer(data, np.uint8).reshape(-1, width)[:, ::-1].tobytes()
            dst.writestr(info, data)
    _same_tensors(lc.load_state_dict(tmp_path / "be.pt"), sd)


# --------------------------------------------------------------------------------------- refusals


def _marker_payload(marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    assert "weights_only" not in msg and "trust" not in msg, msg  # no advice to switch the safety off
    return msg


def test_a_payload_outside_the_weights_runs_nothing_and_the_weights_load(golden_sd, tmp_path):
    marker = tmp_path / "pwned"
    for zip_format in (True, False):
        path = tmp_path / f"evil-{zip_format}.ckpt"
        torch.save({"state_dict": golden_sd, "hyper_parameters": {"x": _marker_payload(marker)}}, path,
                   _use_new_zipfile_serialization=zip_format)
        _same_tensors(lc.load_state_dict(path), golden_sd)
        rec = lc.load(path)["hyper_parameters"]["x"]
        assert lc.global_of(rec) in ("posix.system", "os.system", "nt.system") and rec.args[0].startswith("touch")
        tok_convert.main([str(path), str(tmp_path / f"out-{zip_format}")])
    assert not marker.exists()


def test_a_payload_inside_the_weights_is_refused_naming_it(golden_sd, tmp_path):
    import datetime

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**golden_sd, "x": _marker_payload(marker), "when": datetime.datetime(2024, 1, 1)}}, path)
    with pytest.raises(CheckpointError) as e:
        lc.load_state_dict(path)
    msg = _one_line(e)
    assert "system" in msg and "datetime.datetime" in msg and "'x'" in msg and "'when'" in msg
    with pytest.raises(SystemExit) as e:
        tok_convert.main([str(path), str(tmp_path / "o")])
    assert str(e.value.code).startswith("error: refusing") and "system" in str(e.value.code)
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_no_import_no_setstate_no_plain_pickle(tmp_path, monkeypatch):
    """A module that runs code on import is never imported; a class's __setstate__ never runs; a plain
    pickle (not a torch file) is refused and its payload not run."""
    marker = tmp_path / "imported"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "sideeffect.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        f"class Hook:\n    def __setstate__(self, state):\n        open({str(marker)!r} + '.setstate', 'w').close()\n")
    monkeypatch.syspath_prepend(str(pkg))
    import sideeffect  # noqa: E402 (imported for the save only)

    path = tmp_path / "hooked.pt"
    hook = sideeffect.Hook()
    hook.__dict__["x"] = 1
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": hook}, path)
    marker.unlink()
    del sys.modules["sideeffect"]
    obj = lc.load(path)
    assert lc.global_of(obj["hook"]) == "sideeffect.Hook" and obj["hook"].state == {"x": 1}
    assert not marker.exists() and not Path(str(marker) + ".setstate").exists() and "sideeffect" not in sys.modules

    run_marker = tmp_path / "pwned"
    plain = tmp_path / "plain.ckpt"
    with open(plain, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": _marker_payload(run_marker)}, f)
    with pytest.raises(CheckpointError, match="refusing to load .*not a torch.save file") as e:
        load_legacy(plain)
    _one_line(e)
    assert not run_marker.exists()


def test_damaged_and_foreign_files_are_one_line_refusals(golden_sd, tmp_path):
    torch.save({"state_dict": golden_sd}, tmp_path / "ok.ckpt")
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": golden_sd}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    old = (tmp_path / "old.ckpt").read_bytes()
    (tmp_path / "old-half.ckpt").write_bytes(old[: len(old) - 100])
    torch.save([1, 2], tmp_path / "list.ckpt")
    for name in ("half.ckpt", "empty.ckpt", "text.ckpt", "old-half.ckpt", "missing.ckpt"):
        with pytest.raises(CheckpointError, match=f"refusing to load .*{name}") as e:
            lc.load_state_dict(tmp_path / name)
        _one_line(e)
    with pytest.raises(CheckpointError, match="no state dict: a list") as e:
        lc.load_state_dict(tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="a directory"):
        lc.load(tmp_path)
