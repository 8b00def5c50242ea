"""SIGTERM/SIGINT -> checkpoint of the finished step, exit 128 + signal, and an exact resume (both trainers)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.free_port import free_port
from shared.checkpoint import load_trainer_state
from shared.run_checkpoints import step_dirs
from shared.config import resolve
from shared.device import DistInfo, init_distributed
from shared.preemption import Preemption, exit_code_for
from shared.runlog import read_metrics

REPO = Path(__file__).resolve().parents[2]
CPU = DistInfo(0, 0, 1, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_is_recorded_and_handlers_restored(sig, code):
    before = signal.getsignal(sig)
    with Preemption() as stop:
        assert not stop.requested and not stop.should_stop(CPU) and stop.exit_code == 0
        os.kill(os.getpid(), sig)  # the process survives: the handler only records it
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested and not stop.stopped
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        time.sleep(0.05)
        assert stop.should_stop(CPU) and stop.should_stop(None)
        assert stop.stopped and stop.exit_code == code == exit_code_for(sig)
        assert stop.signal_name == sig.name
    assert signal.getsignal(sig) == before


def test_forked_children_ignore_the_inherited_handler():
    with Preemption() as stop:
        pid = os.fork()
        if pid == 0:  # child: a SIGTERM reaches the inherited handler, which leaves the decision to the parent
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os._exit(0 if not stop.requested else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not stop.requested


def _agree(rank, world, port, result_dir):
    """One rank of a gloo group: rank 1 is signalled before step 3; both must stop after step 3."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    info = DistInfo(rank, rank, world, torch.device("cpu"))
    with Preemption() as stop:
        step = 0
        while step < 10:
            step += 1
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            if stop.should_stop(info):
                break
    (Path(result_dir) / f"rank{rank}").write_text(f"{step} {stop.requested} {stop.exit_code}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_ranks_stop_after_the_same_step(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_agree, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    assert (tmp_path / "rank0").read_text() == "3 False 143"  # not signalled itself, same stop and status
    assert (tmp_path / "rank1").read_text() == "3 True 143"


# ---------------------------------------------------------------------------------------------- trainers


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return env


def _preempt(cmd, out: Path, after_step: int = 2, sig=signal.SIGTERM, timeout=120, group=False):
    """Start ``cmd``, send ``sig`` once metrics.jsonl shows ``after_step`` (to its whole process group with
    ``group``, as a scheduler or Ctrl-C does, loader workers included); return (returncode, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            f = out / "metrics.jsonl"
            if f.is_file() and any(r.get("step", 0) >= after_step for r in read_metrics(f)):
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _stopped_at(out: Path, total: int) -> int:
    """The single checkpoint left by the preempted run is at the last step it logged (log_every=1)."""
    dirs = step_dirs(out)
    assert len(dirs) == 1, dirs
    step = load_trainer_state(dirs[0])["step"]
    assert dirs[0].name == f"step-{step:08d}"
    assert 2 <= step < total
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == step
    return step


def _same_weights(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.usefixtures("one_thread")  # the same thread count as the subprocess: bit-identical sums
def test_stage1_sigterm_checkpoints_and_resumes_exactly(tmp_path, photos):
    from stage1_tokenizer.train import Trainer
    from stage1_tokenizer.train_config import PRESETS, TrainConfig

    total = 20
    args = [f"data.root={photos}", f"max_steps={total}", "ckpt_every=1000", "image_every=0", "threads=1"]
    cut = tmp_path / "cut"
    rc, err = _preempt([sys.executable, "-m", "stage1_tokenizer.train", "--config", "tokenizer-tiny",
                        f"out_dir={cut}", *args], cut)
    assert rc == 143, err[-3000:]
    step = _stopped_at(cut, total)
    assert f"preempted (SIGTERM): stopped after step {step} with a checkpoint" in err
    assert not (cut / "final").exists()

    def run(out):
        t = Trainer(resolve(TrainConfig, PRESETS, "tokenizer-tiny", [f"out_dir={out}", *args]), init_distributed("cpu"))
        t.fit()
        assert t.preempted == 0
        return t

    resumed = run(cut)  # resume=auto picks up the preemption checkpoint
    assert resumed.step == total
    run(tmp_path / "full")
    losses = lambda out: {r["step"]: (r["g/loss"], r["d/loss"]) for r in read_metrics(out / "metrics.jsonl")}
    assert losses(cut) == losses(tmp_path / "full") and sorted(losses(cut)) == list(range(1, total + 1))
    _same_weights(cut / f"step-{total:08d}", tmp_path / "full" / f"step-{total:08d}")


def test_stage1_sigterm_to_the_process_group_spares_loader_workers(tmp_path, photos):
    out = tmp_path / "run"
    rc, err = _preempt([sys.executable, "-m", "stage1_tokenizer.train", "--config", "tokenizer-tiny",
                        f"out_dir={out}", f"data.root={photos}", "max_steps=40", "ckpt_every=1000",
                        "image_every=0", "threads=1", "data.num_workers=2"], out, group=True)
    assert rc == 143, err[-3000:]
    step = _stopped_at(out, 40)
    assert f"preempted (SIGTERM): stopped after step {step} with a checkpoint" in err


@pytest.fixture
def shards(token_dataset):
    """128 images, one random 4x4 grid per class, 10 classes, 4 KiB shards (conftest's token_dataset)."""
    return token_dataset(128, tokens="by-class", shard_bytes=1 << 12)


@pytest.mark.usefixtures("one_thread")
def test_stage2_sigint_checkpoints_and_resumes_exactly(tmp_path, shards):
    from stage2_ar.train import train
    from stage2_ar.train_config import PRESETS, TrainConfig

    total = 16  # 16 x 16 images over 128: the resumed part crosses an epoch boundary
    args = [f"data.path={shards}", "data.clean_stale_shm=false", "data.num_workers=2", f"schedule.max_steps={total}",
            "schedule.warmup_steps=3", "ckpt_every=100", "log_every=1"]
    cut = tmp_path / "cut"
    rc, err = _preempt([sys.executable, "-m", "stage2_ar.train", "--config", "ar-tiny", f"out_dir={cut}", *args], cut,
                       sig=signal.SIGINT)
    assert rc == 130, err[-3000:]
    step = _stopped_at(cut, total)
    assert f"preempted (SIGINT): stopped after step {step} with a checkpoint" in err

    run = lambda out: train(resolve(TrainConfig, PRESETS, "ar-tiny", [f"out_dir={out}", *args]))
    assert run(cut)["preempted"] == 0  # resume=auto
    assert run(tmp_path / "full")["step"] == total
    losses = lambda out: {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}
    assert losses(cut) == losses(tmp_path / "full") and sorted(losses(cut)) == list(range(1, total + 1))
    _same_weights(cut / f"step-{total:08d}", tmp_path / "full" / f"step-{total:08d}")


@pytest.mark.slow
def test_stage1_under_torchrun_all_ranks_stop_together_and_resume_exactly(tmp_path, photos, torchrun_cmd):
    """SIGTERM to torchrun, which forwards it to both workers: one checkpoint, then an exact 2-process resume."""
    total = 30
    base = ["-m", "stage1_tokenizer.train", "--config", "tokenizer-tiny", f"data.root={photos}", f"max_steps={total}",
            "ckpt_every=1000", "image_every=0", "threads=1"]
    cut, full = tmp_path / "cut", tmp_path / "full"
    rc, err = _preempt(torchrun_cmd + base + [f"out_dir={cut}"], cut)
    assert rc != 0, err[-3000:]  # torchrun's own status; each worker exits 143
    step = _stopped_at(cut, total)
    assert err.count(f"preempted (SIGTERM): stopped after step {step} with a checkpoint") == 2  # both ranks
    assert len(load_trainer_state(cut / f"step-{step:08d}")["ranks"]) == 2
    for out in (cut, full):
        r = subprocess.run(torchrun_cmd[:-1] + [f"--master_port={free_port()}"] + base + [f"out_dir={out}"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    losses = lambda out: {r["step"]: (r["g/loss"], r["d/loss"]) for r in read_metrics(out / "metrics.jsonl")}
    assert losses(cut) == losses(full) and sorted(losses(cut)) == list(range(1, total + 1))
    _same_weights(cut / f"step-{total:08d}", full / f"step-{total:08d}")
