"""FSDP (per-block sharding, the large presets' mode) on 2 CPU ranks: same steps as one device, exact resume."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.config import resolve
from stage2_ar.train import train
from stage2_ar.train_config import PRESETS, TrainConfig
from support.free_port import free_port

REPO = Path(__file__).resolve().parents[2]


def _two_ranks(args):
    port, procs = free_port(), []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
                    "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", "stage2_ar.train", "--config", "ar-tiny", *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-4000:]


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_device_and_resume(tmp_path, token_dataset):
    ds = token_dataset(64, tokens="by-class")  # 64 images, one random 4x4 grid per class, 10 classes
    common = [f"data.path={ds}", "data.clean_stale_shm=false", "schedule.max_steps=4",
              "schedule.warmup_steps=1", "data.micro_batch=4", "data.num_canonical_nodes=2", "ckpt_every=100",
              "model.class_dropout=0.0", "model.embed_dropout=0.0", "model.resid_dropout=0.0", "optim.lr=3e-3"]
    _two_ranks(common + ["parallel=fsdp", f"out_dir={tmp_path / 'fsdp'}", "stop_after=2"])
    _two_ranks(common + ["parallel=fsdp", f"out_dir={tmp_path / 'fsdp'}"])  # resumes at step 2, sharded optimiser
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(resolve(TrainConfig, PRESETS, "ar-tiny", common + [f"out_dir={tmp_path / 'one'}"]))
    finally:
        torch.set_num_threads(n)
    a = load_file(str(tmp_path / "one" / "step-00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # one Adam step moves ~3e-3
