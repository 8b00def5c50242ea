import os
import re
import subprocess
import sys
import textwrap

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
