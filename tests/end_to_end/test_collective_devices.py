"""Every collective of the trainers and evaluators is handed tensors on the process group's device.

NCCL reduces only CUDA tensors (HCCL only NPU ones), so a CPU tensor reaching it fails where users run; gloo
takes anything, so on CPU the device is checked by recording it: each CLI runs under a 2-process gloo
torchrun through tests/support/collective_trace.py, which logs (collective, tensor device, group device, caller) per
rank. The same wrapper drives the one-GPU NCCL check, bench/gpu_collectives.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import collectives

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO / "tests" / "support" / "collective_trace.py"


# ---------------------------------------------------------------------------------- the group's device


def _fake_group(monkeypatch, backend):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)


def test_collective_device_follows_the_backend(monkeypatch):
    _fake_group(monkeypatch, "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)
    _fake_group(monkeypatch, "gloo")
    assert collectives.collective_device() == torch.device("cpu")


def test_collective_device_is_the_current_npu_for_hccl():
    """torch knows the "npu" device type only once torch_npu registers it: a subprocess stands in for that
    (renaming the private-use backend cannot be undone, so not in this process)."""
    code = """if True:
        import types
        import torch
        import torch.distributed as dist
        from shared import collectives
        torch.utils.rename_privateuse1_backend("npu")
        torch.npu = types.SimpleNamespace(current_device=lambda: 5)
        dist.is_initialized = lambda: True
        dist.get_world_size = lambda group=None: 4
        dist.get_backend = lambda group=None: "hccl"
        print(collectives.collective_device())
    """
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "npu:5"


def test_all_gather_rows_is_the_identity_on_one_process():
    t = torch.arange(6.0).reshape(3, 2)
    assert collectives.all_gather_rows(t) is t


def _gather_rank(rank, world, port, out_dir):
    """One rank of a gloo group: rank 1 has no rows, the others 3; then 1, 2, 3 integers."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * rank
    if rank == 1:  # none: an empty block whose width comes from the others
        rows = torch.zeros((0, 0), dtype=torch.float64)
    got = {"rows": collectives.all_gather_rows(rows).tolist(),
           "ints": collectives.all_gather_rows(torch.arange(rank + 1)).tolist()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_gather_rows_of_uneven_and_empty_ranks(tmp_path):
    import torch.multiprocessing as mp

    from support.free_port import free_port

    mp.start_processes(_gather_rank, args=(3, free_port(), str(tmp_path)), nprocs=3, start_method="fork")
    block = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    for rank in range(3):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["rows"] == block + [[v + 20 for v in row] for row in block]  # rank 1 had none
        assert got["ints"] == [0, 0, 1, 0, 1, 2]


# ---------------------------------------------------------------------------------- traced CLIs


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return env


def traced(torchrun_cmd, trace_dir, module, *args, timeout=240):
    """Run ``module`` under the 2-process torchrun through the trace wrapper; the two ranks' records."""
    r = subprocess.run(torchrun_cmd + [str(TRACE), str(trace_dir), module, *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((trace_dir / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert [t["world_size"] for t in ranks] == [2, 2]
    return [t["records"] for t in ranks]


def check_devices(ranks, expected):
    """Every tensor on the gloo group's device (the CPU); both ranks the same collectives in the same order
    (or they would wait on each other); every (collective, caller) of ``expected`` among them."""
    for records in ranks:
        assert records, "no collective was recorded"
        assert {r["backend"] for r in records} == {"gloo"}
        tensors = [r for r in records if r["device"] is not None]
        assert all(r["device"] == r["group_device"] == "cpu" for r in tensors), tensors
    calls = [[(r["name"], r["caller"]) for r in records] for records in ranks]
    assert calls[0] == calls[1]
    missing = set(expected) - set(calls[0])
    assert not missing, f"{sorted(missing)} not among {sorted(set(calls[0]))}"


@pytest.fixture(scope="module")
def photos16(tmp_path_factory):
    from PIL import Image

    from support.fixtures_images import export_skimage_photos

    root = tmp_path_factory.mktemp("photos16")
    export_skimage_photos(root, tile=128, names=("astronaut",))
    for p in sorted(root.iterdir()):
        Image.open(p).resize((20, 20), Image.BICUBIC).save(p)
    return root


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage1_trainer_collectives(tmp_path, photos16, torchrun_cmd):
    ranks = traced(torchrun_cmd, tmp_path / "trace", "stage1_tokenizer.train", "--config", "tokenizer-tiny",
                   f"data.root={photos16}", f"out_dir={tmp_path / 'run'}", "max_steps=2", "ckpt_every=2",
                   "image_every=0", "threads=1", "model.global_codebook_entropy=true")
    check_devices(ranks, {
        ("all_reduce", "stage1_tokenizer/train.py:_fit"),           # logged stats, mean over ranks
        ("all_reduce", "stage1_tokenizer/train.py:train_step"),     # LeCAM's mean logits
        ("all_reduce", "stage1_tokenizer/lfq.py:forward"),          # global codebook distribution ...
        ("all_reduce", "stage1_tokenizer/lfq.py:backward"),         # ... and its gradient
        ("all_reduce", "stage1_tokenizer/lfq.py:_codebook_sums"),   # ... and the token count
        ("all_reduce", "shared/preemption.py:should_stop"),         # the agreed stop, every step
        ("gather_objects", "shared/run_checkpoints.py:save_training_checkpoint"),  # per-rank checkpoint state
        ("barrier", "shared/run_checkpoints.py:save_training_checkpoint"),
        ("barrier", "shared/training_run.py:__enter__"),            # after rank 0's clean-up of leftovers
    })


@pytest.fixture
def tokens(token_dataset):
    """64 images, one random 4x4 grid per class, 10 classes (conftest's token_dataset)."""
    return token_dataset(64, tokens="by-class")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage2_trainer_collectives(tmp_path, tokens, torchrun_cmd):
    ranks = traced(torchrun_cmd, tmp_path / "trace", "stage2_ar.train", "--config", "ar-tiny",
                   f"data.path={tokens}", "data.clean_stale_shm=false", f"out_dir={tmp_path / 'run'}",
                   "schedule.max_steps=2", "schedule.warmup_steps=1", "data.micro_batch=4", "data.global_batch=8",
                   "data.num_canonical_nodes=2", "ckpt_every=2", "threads=1")
    check_devices(ranks, {
        ("all_reduce", "stage2_ar/train.py:_train"),                # logged loss, mean over ranks
        ("all_reduce", "shared/preemption.py:should_stop"),
        ("gather_objects", "shared/run_checkpoints.py:save_training_checkpoint"),
        ("barrier", "shared/run_checkpoints.py:save_training_checkpoint"),
        ("barrier", "shared/training_run.py:__enter__"),
    })


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from support.random_inception import write_random_inception

    return write_random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage1_evaluator_collectives(tmp_path, photos16, inception_file, torchrun_cmd, tiny_tokenizer_ckpt):
    ranks = traced(torchrun_cmd, tmp_path / "trace", "stage1_tokenizer.evaluate", "--ckpt", str(tiny_tokenizer_ckpt),
                   "--data", str(photos16), "--resolution", "16", "--workers", "0", "--batch-size", "2",
                   "--limit", "5", "--inception", str(inception_file), "--require", "rfid", "--device", "cpu",
                   "--out", str(tmp_path / "results.json"))
    check_devices(ranks, {
        ("all_reduce", "stage1_tokenizer/evaluate.py:evaluate_tokenizer"),      # sums and code histogram
        ("all_gather", "stage1_tokenizer/evaluate.py:evaluate_tokenizer"),      # Inception features
        ("broadcast_object", "stage1_tokenizer/evaluate.py:evaluate_tokenizer"),  # rank 0's rFID
    })
    assert json.loads((tmp_path / "results.json").read_text())["images"] == 5


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage2_evaluator_collectives(tmp_path, inception_file, torchrun_cmd, tiny_checkpoints):
    from stage2_ar.samples_npz import write_samples

    ar, tok = tiny_checkpoints
    write_samples(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    ranks = traced(torchrun_cmd, tmp_path / "trace", "stage2_ar.evaluate", "--ckpt", str(ar),
                   "--tokenizer", str(tok), "--per-class", "2", "--classes", "0,1", "--batch-size", "2",
                   "--ref", str(tmp_path / "ref.npz"), "--inception", str(inception_file), "--device", "cpu",
                   "--out", str(tmp_path / "eval"))
    check_devices(ranks, {("barrier", "stage2_ar/evaluate.py:_evaluate")})  # every rank's samples are on disk
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 4
