"""Run checkpoints: step-* listing, atomic prune, leftovers of kills removed, resume discovery, stop decisions."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from shared import checkpoint as ck
from shared import run_checkpoints as rc
from shared.config import ConfigError
from shared.device import DistInfo
from shared.run_config import RunConfig, check_run_config
from shared.training_run import TrainingRun

REPO = Path(__file__).resolve().parents[2]


def _save(run_dir, step):
    ck.save_checkpoint(rc.step_dir(run_dir, step), {"w": torch.full((4,), float(step))}, kind="toy",
                       trainer_state={"step": step})


def test_step_dirs_and_prune(tmp_path):
    for s in (10, 2, 30):
        _save(tmp_path, s)
    (tmp_path / "step-00000040").mkdir()  # incomplete: no config.json, no weights
    assert [p.name for p in rc.step_dirs(tmp_path)] == ["step-00000002", "step-00000010", "step-00000030"]
    rc.prune(tmp_path, 2)
    assert [p.name for p in rc.step_dirs(tmp_path)] == ["step-00000010", "step-00000030"]
    rc.prune(tmp_path, 0)  # 0 keeps all
    assert len(rc.step_dirs(tmp_path)) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # prune leaves nothing behind


def test_clean_leftovers_removes_only_our_hidden_names(tmp_path):
    _save(tmp_path, 1)
    ours = [".step-00000002.k3j2x9.tmp", ".step-00000003.old-4242", ".step-00000001.trash-17"]
    theirs = [".step-notes", "step-backup.tmp", ".cache", "my.step-00000002.tmp"]
    for name in ours + theirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / ".step-00000009.zz.tmp-file").write_text("a file, not ours")
    removed = rc.clean_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(theirs + [".step-00000009.zz.tmp-file", "step-00000001"])


# A child that writes and prunes checkpoints, and exits hard (like SIGKILL: no finally, no atexit) at the
# named call of the named phase; the parent then checks what a kill at that instant leaves.
_CHILD = textwrap.dedent("""
    import os, shutil, sys
    import torch
    from shared import atomic, checkpoint as ck, run_checkpoints as rc
    from safetensors import torch as st
    run, phase = sys.argv[1], sys.argv[2]
    def die(*a, **k):
        os._exit(9)
    def save(step):
        ck.save_checkpoint(rc.step_dir(run, step), {"w": torch.full((4,), float(step))}, kind="toy",
                           trainer_state={"step": step})
    for s in (1, 2):
        save(s)
    if phase == "weights":          # mid-write of the new checkpoint
        ck.write_safetensors = lambda path, *a, **k: (open(path, "wb").write(b"partial"), die())
        save(3)
    elif phase == "trainer_state":  # weights and config written, trainer state not yet
        ck.torch.save = die
        save(3)
    elif phase == "replace":        # rewriting step 2: the old one moved aside, the new one not yet in place
        real = os.replace
        calls = []
        def replace(a, b):
            calls.append(a)
            if len(calls) == 2:
                die()
            real(a, b)
        atomic.os.replace = replace
        save(2)
    elif phase == "prune":          # the oldest checkpoint renamed for deletion, half deleted
        save(3)
        def half(path, ignore_errors=False):
            os.remove(os.path.join(path, "model.safetensors"))
            die()
        rc.shutil.rmtree = half
        rc.prune(run, 2)
    """)


@pytest.mark.parametrize("phase", ["weights", "trainer_state", "replace", "prune"])
def test_a_kill_at_any_checkpoint_phase_leaves_only_complete_checkpoints(tmp_path, phase):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), phase], env=env, capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden, "the kill was meant to leave a temporary directory"
    for p in rc.step_dirs(tmp_path):  # every step-* left is complete and loads
        step = int(p.name.split("-")[1])
        assert torch.equal(ck.load_state_dict(p)["w"], torch.full((4,), float(step)))
        assert ck.load_trainer_state(p) == {"step": step}
    names = [p.name for p in rc.step_dirs(tmp_path)]
    assert names == {"weights": ["step-00000001", "step-00000002"], "trainer_state": ["step-00000001", "step-00000002"],
                     "replace": ["step-00000001"], "prune": ["step-00000002", "step-00000003"]}[phase]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("step-") and p not in rc.step_dirs(tmp_path)]
    assert sorted(rc.clean_leftovers(tmp_path)) == sorted(hidden)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigkill_during_a_stream_of_saves_never_leaves_a_broken_step_dir(tmp_path):
    """Real SIGKILLs at arbitrary instants of a save + prune loop (keep_last=2)."""
    loop = textwrap.dedent("""
        import sys, torch
        from shared import checkpoint as ck, run_checkpoints as rc
        run = sys.argv[1]
        step = (rc.step_dirs(run)[-1].name.split("-")[1] if rc.step_dirs(run) else 0)
        step = int(step)
        print("ready", flush=True)
        while True:
            step += 1
            ck.save_checkpoint(rc.step_dir(run, step), {"w": torch.full((256, 256), float(step))}, kind="toy",
                               trainer_state={"step": step})
            rc.prune(run, 2)
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (0.05, 0.13, 0.21, 0.37):
        rc.clean_leftovers(tmp_path)
        p = subprocess.Popen([sys.executable, "-c", loop, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        dirs = rc.step_dirs(tmp_path)
        assert 1 <= len(dirs) <= 3
        for d in dirs:
            step = int(d.name.split("-")[1])
            assert torch.equal(ck.load_state_dict(d)["w"], torch.full((256, 256), float(step)))
            assert ck.load_trainer_state(d) == {"step": step}
        assert all(p.name.startswith(".step-") for p in tmp_path.iterdir() if not p.name.startswith("step-"))
        assert len([p for p in tmp_path.iterdir() if p.name.startswith("step-")]) == len(dirs)


def test_find_resume(tmp_path):
    assert rc.find_resume("auto", tmp_path / "none") is None
    assert rc.find_resume("never", tmp_path) is None
    _save(tmp_path, 3)
    _save(tmp_path, 7)
    assert rc.find_resume("auto", tmp_path).name == "step-00000007"
    assert rc.find_resume("never", tmp_path) is None
    assert rc.find_resume(str(tmp_path / "step-00000003"), tmp_path).name == "step-00000003"
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        rc.find_resume(str(tmp_path / "nope"), tmp_path)
    ck.save_checkpoint(tmp_path / "weights-only", {"w": torch.ones(1)}, kind="toy")
    with pytest.raises(ConfigError, match="trainer_state.pt missing"):
        rc.find_resume(str(tmp_path / "weights-only"), tmp_path)


@pytest.mark.parametrize("bad, match", [
    (dict(resume=""), "resume must be"), (dict(precision="fp8"), "precision must be"),
    (dict(ckpt_every=0), "ckpt_every"), (dict(log_every=0), "log_every"), (dict(stop_after=-1), "stop_after"),
    (dict(keep_last=-2), "keep_last"), (dict(out_dir=""), "out_dir")])
def test_run_config_is_checked(bad, match):
    with pytest.raises(ConfigError, match=match):
        check_run_config(RunConfig(**bad))
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        check_run_config(RunConfig(precision="fp16"), ("fp32", "bf16"))


def _drive(run: TrainingRun, start: int, total: int, signal_at: int = 0):
    """Step a TrainingRun from ``start``; returns (steps saved, step the loop left at)."""
    saved, step = [], start
    run.begin(start)
    while step < total:
        step += 1
        if step == signal_at:
            run.stop._handle(signal.SIGTERM, None)
        if run.end_of_step(step, total, lambda: saved.append(step)):
            break
    return saved, step


def test_end_of_step_decisions(tmp_path):
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    cfg = RunConfig(out_dir=str(tmp_path), ckpt_every=4, tensorboard=False)
    with TrainingRun(cfg, info) as run:
        assert _drive(run, 0, 10) == ([4, 8, 10], 10)
    assert run.exit_code == 0
    assert (tmp_path / "config.yaml").is_file()
    # stop_after counts the steps of this invocation, from wherever it resumed
    with TrainingRun(RunConfig(out_dir=str(tmp_path), ckpt_every=4, stop_after=3, tensorboard=False), info) as run:
        assert _drive(run, 5, 20) == ([8], 8)
    with TrainingRun(RunConfig(out_dir=str(tmp_path), ckpt_every=4, stop_after=3, tensorboard=False), info) as run:
        assert _drive(run, 0, 20) == ([3], 3)  # not a checkpoint step: saved because it stops there
    # SIGTERM during step 6: the step finishes, a checkpoint of it is written, exit status 143
    with TrainingRun(RunConfig(out_dir=str(tmp_path), ckpt_every=4, tensorboard=False), info) as run:
        assert _drive(run, 0, 20, signal_at=6) == ([4, 6], 6)
    assert run.exit_code == 128 + signal.SIGTERM
    # a signal on a checkpoint step is not saved twice
    with TrainingRun(RunConfig(out_dir=str(tmp_path), ckpt_every=4, tensorboard=False), info) as run:
        assert _drive(run, 0, 20, signal_at=8) == ([4, 8], 8)


def test_training_run_cleans_leftovers_on_enter_and_writes_nothing_before_begin(tmp_path):
    (tmp_path / ".step-00000004.abc.tmp").mkdir()
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    with TrainingRun(RunConfig(out_dir=str(tmp_path), tensorboard=False), info):
        assert list(tmp_path.iterdir()) == []  # a refused resume leaves no config.yaml or metrics.jsonl


def _trainer_state(world, micro_batch):
    return {"step": 3, "world_size": world, "micro_batch": micro_batch, "opt": 1,
            "ranks": [{"rng": f"rng{r}", "data": {"pos": 9}} for r in range(world)]}


def test_one_resume_rule_for_both_stages(tmp_path):
    """Same world size and micro-batch: exact (this rank's entry). Otherwise refused in one line, unless the
    data position is global (Stage 2's Streaming loader): then the state without an entry (RNG re-seeded)."""
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    run = TrainingRun(RunConfig(out_dir=str(tmp_path / "run"), tensorboard=False), info)
    for name, world, mb in (("same", 1, 4), ("two", 2, 4), ("mb", 1, 8)):
        ck.save_checkpoint(tmp_path / name, {"w": torch.ones(1)}, kind="toy", trainer_state=_trainer_state(world, mb))
    for global_data in (False, True):
        state, mine = run.load_state(tmp_path / "same", 4, global_data=global_data)
        assert state["opt"] == 1 and mine == {"rng": "rng0", "data": {"pos": 9}}
    with pytest.raises(ck.CheckpointError, match=r"two was written by 2 processes with micro_batch 4; exact resume "
                                                 r"needs the same \(now 1 x 4\)$"):
        run.load_state(tmp_path / "two", 4, global_data=False)
    with pytest.raises(ck.CheckpointError, match=r"written by 1 processes with micro_batch 8; .*\(now 1 x 4\)$"):
        run.load_state(tmp_path / "mb", 4, global_data=False)
    for name in ("two", "mb"):
        state, mine = run.load_state(tmp_path / name, 4, global_data=True)
        assert state["step"] == 3 and mine is None
    ck.save_checkpoint(tmp_path / "bare", {"w": torch.ones(1)}, kind="toy")
    with pytest.raises(ck.CheckpointError, match="bare has no trainer_state.pt"):
        run.load_state(tmp_path / "bare", 4, global_data=True)


@dataclass(frozen=True)
class _Model:
    width: int = 4


@dataclass(frozen=True)
class _Config(RunConfig):
    model: _Model = field(default_factory=_Model)


class _Loader:
    def state_dict(self):
        return {"pos": 7}


def test_one_checkpoint_layout_for_both_stages(tmp_path):
    """config.json: the model's config (what from_checkpoint rebuilds) and the training config under extra;
    trainer_state.pt: the trainer's state, step, world size and every rank's RNG and data position."""
    cfg = _Config(out_dir=str(tmp_path), tensorboard=False, keep_last=1)
    run = TrainingRun(cfg, DistInfo(0, 0, 1, torch.device("cpu")))
    for step in (2, 4):
        path = run.save(step, kind="toy", weights=lambda: {"w": torch.ones(2)}, trainer_state=lambda: {"opt": 1},
                        model_config=cfg.model, loader=_Loader(), extra={"tokens": {"grid": [4, 4]}})
    assert path == rc.step_dir(tmp_path, 4) and rc.step_dirs(tmp_path) == [path]  # keep_last pruned step 2
    meta = ck.load_meta(path)
    assert meta["kind"] == "toy" and meta["config"] == {"width": 4}
    assert meta["extra"]["train_config"]["model"] == {"width": 4} and meta["extra"]["train_config"]["keep_last"] == 1
    assert meta["extra"]["step"] == 4 and meta["extra"]["tokens"] == {"grid": [4, 4]}
    state = ck.load_trainer_state(path)
    assert state["opt"] == 1 and state["step"] == 4 and state["world_size"] == 1
    assert len(state["ranks"]) == 1 and state["ranks"][0]["data"] == {"pos": 7} and "torch" in state["ranks"][0]["rng"]


def test_a_named_resume_checkpoint_is_checked_before_any_work(tmp_path):
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        TrainingRun(RunConfig(out_dir=str(tmp_path / "run"), resume=str(tmp_path / "nope"), tensorboard=False), info)
    assert not (tmp_path / "run").exists()
