"""Both trainers under a 2-process torchrun free their parallel-wrapped models before the process group is
destroyed (``shared.device.distributed_session``).

Before, the trainer lived in reference cycles until interpreter shutdown, and its DDP models with it: the
group's C++ object then died during finalization, where gloo's teardown sometimes aborted a rank ("terminate
called without an active exception", SIGABRT) after a run that had succeeded, and torchrun reported a failed
run. The probe counts the wrapped models alive at ``destroy_process_group`` on each rank (2 per rank before).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", ["stage1", "stage2-ddp", "stage2-fsdp"])
def test_no_wrapped_model_outlives_the_process_group(tmp_path, photos, token_dataset, torchrun_cmd, case):
    if case == "stage1":
        args = ["stage1_tokenizer.train", "--config", "tokenizer-tiny", f"data.root={photos}", "max_steps=2",
                "image_every=0", "threads=1"]
    else:
        args = ["stage2_ar.train", "--config", "ar-tiny", f"data.path={token_dataset(64)}", "data.clean_stale_shm=false",
                "schedule.max_steps=2", "schedule.warmup_steps=1", "data.micro_batch=4", "data.num_canonical_nodes=2",
                f"parallel={case.split('-')[1]}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"})
    r = subprocess.run([*torchrun_cmd, "-m", "support.teardown_probe", str(tmp_path), *args, f"out_dir={tmp_path / 'run'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"live-at-teardown.rank{k}").read_text() for k in (0, 1)] == ["0", "0"]
