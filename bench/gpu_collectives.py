"""GPU check (not a benchmark): each trainer's collectives on NCCL, handed CUDA tensors only.

    python bench/gpu_collectives.py [--steps 2] [--timeout 300] [--keep DIR]
    python bench/gpu_collectives.py --smoke      # the same code path with gloo on the CPU (the test suite's)

For each trainer (``stage1_tokenizer.train --config tokenizer-tiny``, ``stage2_ar.train --config ar-tiny``)
a one-rank torchrun (``--nproc_per_node 1``) runs a few steps with ``device=cuda`` through
``tests/support/collective_trace.py --force-group nccl``: the process group is NCCL and every collective reaches it
(a one-rank group's are the identity on the values, and ``shared.collectives`` would skip them otherwise),
so a CPU tensor handed to NCCL fails the run. The trace must then show the expected collectives with every
tensor on the group's CUDA device. Data: random 20 px images and a random token dataset, made here.

Exit status 0 when every trainer passes, 1 otherwise; the last line says which. Without CUDA (and without
--smoke) it prints that it was skipped and exits 0. Called by bench/gpu_check.py, the prepared GPU check.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRACE = REPO / "tests" / "support" / "collective_trace.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(root: Path, n: int = 16) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def make_tokens(root: Path) -> Path:
    from shared.token_dataset.writer import write_dataset

    rng = np.random.default_rng(0)
    labels = np.arange(64) % 10
    tokens = rng.integers(0, 1 << 18, (10, 16))[labels]  # one sequence per class: learnable in a few steps
    write_dataset(root, {"train": (tokens, labels)}, grid=(4, 4), classes=[f"c{i}" for i in range(10)],
                  resolution=8, tokenizer={"preset": "random", "config": {}, "checkpoint_sha256": "0" * 64})
    return root


def trainers(work: Path, steps: int, device: str):
    """(module, arguments, collectives that must appear as (name, caller)) of each trainer."""
    ckpt = [("gather_objects", "shared/run_checkpoints.py:save_training_checkpoint"),
            ("barrier", "shared/run_checkpoints.py:save_training_checkpoint")]
    yield ("stage1_tokenizer.train",
           ["--config", "tokenizer-tiny", f"data.root={make_images(work / 'images')}", f"out_dir={work / 'tok'}",
            f"max_steps={steps}", f"ckpt_every={steps}", "image_every=0", f"device={device}", "threads=1",
            "model.global_codebook_entropy=true"],
           [("all_reduce", "stage1_tokenizer/train.py:_fit"), ("all_reduce", "stage1_tokenizer/train.py:train_step"),
            ("all_reduce", "stage1_tokenizer/lfq.py:forward"), ("all_reduce", "stage1_tokenizer/lfq.py:backward"),
            *ckpt])
    yield ("stage2_ar.train",
           ["--config", "ar-tiny", f"data.path={make_tokens(work / 'tokens')}", "data.clean_stale_shm=false",
            f"out_dir={work / 'ar'}", f"schedule.max_steps={steps}", "schedule.warmup_steps=1",
            f"ckpt_every={steps}", f"device={device}", "threads=1"],
           [("all_reduce", "stage2_ar/train.py:_train"), *ckpt])


def check(module: str, args, expected, work: Path, timeout: int, backend: str, device: str) -> list:
    """Problems found with one trainer (empty: it passed)."""
    trace = work / f"trace-{module}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={_port()}", str(TRACE), "--force-group", backend, str(trace), module, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"timed out after {timeout} s"]
    if r.returncode != 0:
        return [f"exit {r.returncode}: {r.stderr.strip()[-3000:]}"]
    records = json.loads((trace / "rank-0.json").read_text())["records"]
    problems = []
    if {x["backend"] for x in records} != {backend}:
        problems.append(f"backends {sorted({x['backend'] for x in records})}, expected {backend}")
    bad = [x for x in records if x["device"] is not None
           and (x["device"] != x["group_device"] or not x["device"].startswith(device))]
    problems += [f"{x['name']} from {x['caller']} on {x['device']}, group device {x['group_device']}" for x in bad]
    seen = {(x["name"], x["caller"]) for x in records}
    problems += [f"no {name} from {caller}" for name, caller in expected if (name, caller) not in seen]
    tensors = sum(x["device"] is not None for x in records)
    print(f"{module}: {len(records)} collectives ({tensors} with tensors, on "
          f"{sorted({x['device'] for x in records if x['device']})}), {'ok' if not problems else 'FAILED'}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=int, default=300, help="seconds per trainer")
    p.add_argument("--keep", type=Path, default=None, help="work in this new directory (kept), not a temporary one")
    p.add_argument("--smoke", action="store_true", help="gloo and the CPU instead of NCCL and CUDA")
    a = p.parse_args()
    backend, device = ("gloo", "cpu") if a.smoke else ("nccl", "cuda")
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_collectives: skipped (no CUDA device)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = a.keep or Path(tmp) / "work"
        work.mkdir(parents=True)
        failed = 0
        for module, args, expected in trainers(work, a.steps, device):
            problems = check(module, args, expected, work, a.timeout, backend, device)
            for line in problems:
                print(f"  {module}: {line}")
            failed += bool(problems)
    verdict = "both trainers passed" if not failed else f"{failed} trainer(s) FAILED"
    print(f"gpu_collectives ({backend}, {device}): {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
