"""No space left on device: a checkpoint write that fills the disk is one line naming the path, and leaves no
step-* directory (nor a hidden temporary one) behind; both trainers stop with that line and exit 1."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import atomic, checkpoint, run_checkpoints

REPO = Path(__file__).resolve().parents[2]
# what torch.save's zip writer raises when the disk fills under it (the write came up short)
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 45248 vs 45140"


def _save(run_dir):
    return run_checkpoints.save_training_checkpoint(
        run_dir, 2, kind="test", weights=lambda: {"w": torch.zeros(8)}, trainer_state=lambda: {"opt": torch.ones(4)},
        per_rank={"rng": 0}, config={"a": 1}, keep_last=0, is_main=True)


@pytest.mark.parametrize("where", ["torch.save", "safetensors", "config.json"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, where):
    if where == "torch.save":
        def full(*a, **k):
            raise RuntimeError(TORCH_FULL)
        monkeypatch.setattr(checkpoint.torch, "save", full)
    elif where == "safetensors":
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(checkpoint, "write_safetensors", full)
    else:
        real = Path.write_text

        def full(self, *a, **k):
            if self.name == checkpoint.CONFIG:
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real(self, *a, **k)
        monkeypatch.setattr(Path, "write_text", full)
    run_dir = tmp_path / "run"
    with pytest.raises(atomic.DiskFullError) as e:
        _save(run_dir)
    msg = str(e.value)
    assert msg == f"{run_dir / 'step-00000002'}: no space left on device (free some space and run the same " \
                  "command again)"
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and "\n" not in msg
    assert run_checkpoints.step_dirs(run_dir) == [] and os.listdir(run_dir) == []


def test_a_full_disk_during_an_atomic_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "state.json"
    atomic.write_text(f, "old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(atomic.DiskFullError, match=f"^{f}: no space left on device"):
        atomic.write_text(f, "new")
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_a_real_full_file_system_if_one_can_be_mounted(tmp_path):
    """A 128 KiB tmpfs (needs root; skipped elsewhere): the real errors of torch.save and safetensors."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        for name, weights, state in (("a", 1000, 100_000), ("b", 100_000, None)):
            with pytest.raises(atomic.DiskFullError, match="no space left on device"):
                checkpoint.save_checkpoint(mnt / name, {"w": torch.zeros(weights)}, kind="x",
                                           trainer_state=None if state is None else {"o": torch.zeros(state)})
            assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


SITE = '''
import os
if os.environ.get("TEST_DISK_FULL"):
    import torch

    def save(*a, **k):
        raise RuntimeError({full!r})
    torch.save = save
'''


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_both_trainers_stop_in_one_line_when_a_checkpoint_fills_the_disk(tmp_path, photos, stage):
    from support.synthetic_tokens import write_tokens

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(full=TORCH_FULL))
    out = tmp_path / "run"
    if stage == "stage1":
        args = ["-m", "stage1_tokenizer.train", "--config", "tokenizer-tiny", f"data.root={photos}", "max_steps=4",
                "ckpt_every=2", "image_every=0", "threads=1"]
    else:
        data = tmp_path / "tokens"
        tok = np.random.default_rng(0).integers(0, 1 << 18, (64, 16))
        write_tokens(data, {"train": (tok, np.arange(64) % 10)}, grid=(4, 4), num_classes=10)
        args = ["-m", "stage2_ar.train", "--config", "ar-tiny", f"data.path={data}", "data.clean_stale_shm=false",
                "data.num_workers=0", "schedule.max_steps=4", "schedule.warmup_steps=1", "ckpt_every=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": f"{site}:{REPO}", "OMP_NUM_THREADS": "1", "TEST_DISK_FULL": "1"})
    p = subprocess.run([sys.executable, *args, f"out_dir={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and err and err[-1] == (
        f"error: {out / 'step-00000002'}: no space left on device (free some space and run the same command "
        "again)"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert run_checkpoints.step_dirs(out) == [] and not [d for d in os.listdir(out) if "step-" in d]
