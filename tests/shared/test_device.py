import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shared import device as D

WORKER = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from shared.device import init_distributed, cleanup_distributed
    info = init_distributed("cpu")
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    x = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(x)
    print(f"rank={info.rank} world={info.world_size} local={info.local_rank} sum={x.item()}", flush=True)
    cleanup_distributed()
    """
)


def test_single_process_defaults(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")
    assert D.device_type() in ("cpu", "cuda", "npu")
    with pytest.raises(ValueError):
        D.device_type("tpu")


def test_autocast_contexts():
    cpu = torch.device("cpu")
    a = torch.randn(4, 4)
    with D.autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with D.autocast(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError):
        D.autocast(cpu, "fp8")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_all_reduce(tmp_path, torchrun_cmd):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*torchrun_cmd, str(script)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # the two processes share one pipe, so their lines may interleave: match records, not lines
    lines = sorted(re.findall(r"rank=\d world=\d local=\d sum=[\d.]+", out.stdout))
    assert lines == ["rank=0 world=2 local=0 sum=3.0", "rank=1 world=2 local=1 sum=3.0"]


class _FakeNPU:
    """Stands in for ``torch.npu`` (torch_npu): per-device RNG states and the calls device setup makes."""

    def __init__(self):
        self.states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
        self.current = None

    def is_available(self):
        return True

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states):
        self.states = [s.clone() for s in states]

    def set_device(self, dev):
        self.current = dev


@pytest.fixture
def fake_npu(monkeypatch):
    # torch.device("npu") itself is left alone: registering that name (what torch_npu does) cannot be undone
    npu = _FakeNPU()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_npu_available", lambda: True)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return npu


def test_npu_is_selected_and_its_rng_is_captured_and_restored(fake_npu):
    from shared.rng import rng_state, set_rng_state

    assert D.device_type() == "npu" and D.device_type("npu") == "npu" and D.accelerator_name() == "npu"
    assert D.accelerator_module("npu") is fake_npu
    saved = rng_state()
    assert [s.tolist() for s in saved["npu"]] == [[1, 2, 3], [4, 5]] and "cuda" not in saved
    fake_npu.states = [torch.zeros(3, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8)]
    set_rng_state(saved)
    assert [s.tolist() for s in fake_npu.states] == [[1, 2, 3], [4, 5]]


SESSION_WORKER = textwrap.dedent(
    """
    import gc, sys, time, weakref
    from pathlib import Path
    import torch.distributed as dist
    from shared.device import distributed_session

    out = Path(sys.argv[1])
    freed = []
    real_destroy = dist.destroy_process_group

    def destroy(*a, **k):  # what had been freed when the group was torn down
        (out / f"destroy{dist.get_rank()}").write_text(str(freed))
        real_destroy(*a, **k)
    dist.destroy_process_group = destroy

    class Holder:  # a reference cycle holding the group, as a DDP-wrapped model in a trainer does
        def __init__(self):
            self.me, self.group = self, dist.group.WORLD

    def body(info):
        h = Holder()
        weakref.finalize(h, freed.append, "holder")
        if info.rank == 0:  # the last export of a run: rank 1 must not tear down before it is written
            time.sleep(1.5)
            (out / "export").write_text("done")

    gc.disable()  # only the session's collection may free the cycle
    with distributed_session("cpu") as info:
        body(info)
    rank = info.rank
    (out / f"left{rank}").write_text(str((out / "export").exists()))
    assert not dist.is_initialized()
    """
)


@pytest.mark.slow
def test_distributed_session_meets_collects_then_tears_down(tmp_path, torchrun_cmd):
    script = tmp_path / "worker.py"
    script.write_text(SESSION_WORKER)
    r = subprocess.run([*torchrun_cmd, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "left1").read_text() == "True"  # rank 1 waited for rank 0's export
    assert [(tmp_path / f"destroy{k}").read_text() for k in (0, 1)] == ["['holder']"] * 2


def test_distributed_session_leaves_a_callers_group_alone(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with D.distributed_session("cpu") as info:
            assert info.world_size == 1
        assert dist.is_initialized()
        with pytest.raises(RuntimeError, match="boom"):
            with D.distributed_session("cpu"):
                raise RuntimeError("boom")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
