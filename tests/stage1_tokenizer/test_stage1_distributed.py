"""Stage-1 trainer under a real 2-process torchrun on CPU (gloo): runs, exports, resumes exactly."""
import subprocess
import sys

import pytest
import torch

from shared.checkpoint import load_state_dict, load_trainer_state
from shared.runlog import read_metrics
from stage1_tokenizer.tokenizer import Tokenizer
from support.free_port import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from support.fixtures_images import export_skimage_photos

    root = tmp_path_factory.mktemp("photos")
    export_skimage_photos(root, tile=128, names=("astronaut", "chelsea"), size=20)
    return root


def _torchrun(torchrun_cmd, out, root, *overrides):
    cmd = torchrun_cmd + ["-m", "stage1_tokenizer.train", "--config", "tokenizer-tiny", f"data.root={root}",
                          f"out_dir={out}", "max_steps=4", "ckpt_every=2", "threads=1", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out):
    return {r["step"]: (r["g/loss"], r["d/loss"]) for r in read_metrics(out / "metrics.jsonl") if "g/loss" in r}


def test_two_process_run_resumes_exactly(tmp_path, photos, torchrun_cmd):
    r = _torchrun(torchrun_cmd, tmp_path / "full", photos)
    assert "2 x 1 micro x 2 ranks" in r.stderr  # global batch 4 = micro 2 x 1 step x 2 processes
    st = load_trainer_state(tmp_path / "full" / "step-00000004")
    assert st["world_size"] == 2 and len(st["ranks"]) == 2
    Tokenizer.from_checkpoint(tmp_path / "full" / "final")

    _torchrun(torchrun_cmd, tmp_path / "cut", photos, "stop_after=2")
    _torchrun(torchrun_cmd[:-1] + [f"--master_port={free_port()}"], tmp_path / "cut", photos)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")
    a, b = load_state_dict(tmp_path / "full" / "step-00000004"), load_state_dict(tmp_path / "cut" / "step-00000004")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_world_size_is_refused(tmp_path, photos, torchrun_cmd):
    _torchrun(torchrun_cmd, tmp_path / "run", photos, "stop_after=2")
    r = subprocess.run([sys.executable, "-m", "stage1_tokenizer.train", "--config", "tokenizer-tiny",
                        f"data.root={photos}", f"out_dir={tmp_path / 'run'}", "data.micro_batch=4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "exact resume needs the same" in r.stderr
