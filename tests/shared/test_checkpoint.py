import os
import pickle
from dataclasses import dataclass

import pytest
import torch

from shared import checkpoint as ck
from shared.atomic import atomic_dir
from shared.rng import rng_state, set_rng_state


@dataclass(frozen=True)
class Cfg:
    width: int = 4


def make(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 2))


def test_round_trip_with_trainer_state(tmp_path):
    m = make()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "rng": rng_state()}
    ck.save_checkpoint(tmp_path / "c", m.state_dict(), Cfg(), kind="toy", trainer_state=state, extra={"note": "x"})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "model.safetensors", "trainer_state.pt"]
    meta = ck.load_meta(tmp_path / "c")
    assert meta["kind"] == "toy" and meta["config"] == {"width": 4} and meta["extra"] == {"note": "x"}

    m2 = make()
    for p in m2.parameters():
        torch.nn.init.zeros_(p)
    ck.load_weights(m2, tmp_path / "c", kind="toy")
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    ts = ck.load_trainer_state(tmp_path / "c")
    opt2.load_state_dict(ts["optimizer"])
    assert ts["step"] == 7
    a = torch.rand(3)
    set_rng_state(ts["rng"])
    b = torch.rand(3)
    set_rng_state(ts["rng"])
    assert torch.equal(b, torch.rand(3))


def test_rng_restores_python_numpy_torch():
    import random

    import numpy as np

    s = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(s)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_strict_loading_reports_mismatch(tmp_path):
    ck.save_checkpoint(tmp_path / "c", make(4).state_dict(), kind="toy")
    with pytest.raises(ck.CheckpointError, match="shape mismatch"):
        ck.load_weights(make(5), tmp_path / "c")
    sd = make(4).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["0.bias"]
    ck.save_checkpoint(tmp_path / "d", sd, kind="toy")
    with pytest.raises(ck.CheckpointError, match=r"1 missing .*0\.bias.*1 unexpected .*extra\.weight"):
        ck.load_weights(make(4), tmp_path / "d")
    with pytest.raises(ck.CheckpointError, match="expected 'other'"):
        ck.load_weights(make(4), tmp_path / "c", kind="other")
    with pytest.raises(ck.CheckpointError, match="config.json is missing"):
        ck.load_meta(tmp_path)


def test_shared_tensors_are_saved(tmp_path):
    w = torch.randn(4, 4)
    ck.save_checkpoint(tmp_path / "c", {"a": w, "b": w}, kind="toy")
    sd = ck.load_state_dict(tmp_path / "c")
    assert torch.equal(sd["a"], w) and torch.equal(sd["b"], w)


def test_failed_write_keeps_old_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, kind="toy")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "c", replace_if=lambda p: ck.is_checkpoint(p, "toy")) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert torch.equal(ck.load_state_dict(tmp_path / "c")["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # temp dir cleaned
    ck.save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, kind="toy")  # overwrite in place
    assert torch.equal(ck.load_state_dict(tmp_path / "c")["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, f)
    # the payload is real: an unsafe load would run it
    with pytest.raises(ck.CheckpointError, match="refusing to load"):
        ck.load_legacy(evil)
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ok.ckpt")
    ok = ck.load_legacy(tmp_path / "ok.ckpt")
    assert ok["epoch"] == 3 and torch.equal(ok["state_dict"]["w"], torch.ones(2))
    # and the unsafe path really would have executed it (proves the test's payload is live)
    with open(evil, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_atomic_files_get_umask_permissions(tmp_path):
    import stat

    from shared.atomic import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(1)}, kind="toy")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o755
    for name in ("model.safetensors", "config.json"):  # safetensors alone would make its file 0600
        assert stat.S_IMODE((tmp_path / "c" / name).stat().st_mode) == 0o644, name
