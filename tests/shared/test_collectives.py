"""Rank reductions and gathers: the identity on one process, exact under a 2-process gloo torchrun, and every
tensor handed to a collective on the process group's device."""
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from shared import collectives

REPO = Path(__file__).resolve().parents[2]


def test_single_process_is_the_identity():
    assert not collectives.active() and collectives.world_size() == 1
    got = collectives.mean_over_ranks({"b": torch.tensor(2.5), "a": 1, "c": torch.tensor([[4.0]])})
    assert got == {"a": 1.0, "b": 2.5, "c": 4.0}
    t = torch.arange(3.0)
    assert collectives.all_reduce_(t, "mean") is t and t.tolist() == [0.0, 1.0, 2.0]
    assert collectives.max_int_over_ranks(15) == 15
    assert collectives.gather_objects({"x": 1}) == [{"x": 1}]
    assert collectives.broadcast_object("y") == "y"
    assert collectives.collective_device() == torch.device("cpu")
    collectives.barrier()


_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from shared import collectives
    from shared.device import cleanup_distributed, init_distributed
    seen = []
    collectives.observer = lambda name, t: seen.append((name, str(t.device)))
    info = init_distributed("cpu")
    r = info.rank
    out = {
        "mean": collectives.mean_over_ranks({"x": torch.tensor(float(r + 1)), "y": 10.0 * r}),
        "max": collectives.max_int_over_ranks(15 if r == 1 else 0),
        "sum": collectives.all_reduce_(torch.tensor([r, 2 * r], dtype=torch.float64)).tolist(),
        "gather": collectives.gather_objects({"rank": r}),
        "bcast": collectives.broadcast_object(f"from-{r}"),
        "group_device": str(collectives.collective_device()),
    }
    collectives.barrier()
    out["seen"] = seen
    with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    cleanup_distributed()
    """)


@pytest.mark.slow
def test_two_process_gloo_results_and_devices(tmp_path, torchrun_cmd):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    r = subprocess.run(torchrun_cmd + [str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["mean"] == {"x": 1.5, "y": 5.0}
        assert got["max"] == 15 and got["sum"] == [1.0, 2.0]
        assert got["gather"] == [{"rank": 0}, {"rank": 1}] and got["bcast"] == "from-0"
        assert got["group_device"] == "cpu"
        # every tensor went to the gloo group's device (NCCL would be handed CUDA tensors the same way)
        assert [n for n, _ in got["seen"]] == ["all_reduce"] * 3 and {d for _, d in got["seen"]} == {"cpu"}
