"""Writing a checkpoint's weights: ``shared.safetensors_writer`` (tensor by tensor, so the converters can show
progress) against ``safetensors.torch.save_file`` (one call), on the same tensors in the same run.

    python bench/checkpoint_write.py [--gb 1.0] [--repeats 3]

The tensors are an AR-like mix (a few large fp32 matrices, many small vectors, some bf16); each figure is
the median wall time of ``--repeats`` writes of a file in a temporary directory under the repository, page
cache and all (what a converter or a trainer's checkpoint meets), the two writers alternating. Both files
are checked to hold the same tensors. The ratio is save_file / ours: above 1 means ours is faster.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.safetensors_writer import tensor_bytes, write_safetensors


def tensors(gb: float) -> dict:
    g = torch.Generator().manual_seed(0)
    n_big = max(1, int(gb * 1e9 / (2048 * 8192 * 4)))  # 64 MiB fp32 matrices
    out = {f"layers.{i}.mlp.w": torch.randn(2048, 8192, generator=g) for i in range(n_big)}
    out.update({f"layers.{i}.norm.weight": torch.randn(2048, generator=g) for i in range(4 * n_big)})
    out.update({f"layers.{i}.attn.bias": torch.randn(2048, generator=g).bfloat16() for i in range(n_big)})
    return out


def timed(fns, repeats: int):
    """Median seconds of each function, the functions alternating within each repeat (no order advantage)."""
    times = [[] for _ in fns]
    for r in range(repeats):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the weights to write")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sd = tensors(args.gb)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as d:
        ours, ref = Path(d) / "ours.safetensors", Path(d) / "ref.safetensors"
        t_ref, t_ours = timed([lambda: save_file(sd, str(ref), metadata={"kind": "bench"}),
                               lambda: write_safetensors(ours, sd, metadata={"kind": "bench"})], args.repeats)
        a, b = load_file(str(ours)), load_file(str(ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        sizes = (os.path.getsize(ours), os.path.getsize(ref))
    print(f"checkpoint write, median of {args.repeats}; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{len(sd)} tensors, {tensor_bytes(sd) / 1e9:.2f} GB; file sizes ours {sizes[0]:,} B, save_file {sizes[1]:,} B")
    print(f"{'writer':<28}{'s':>8}{'GB/s':>8}")
    for name, t in (("safetensors.save_file", t_ref), ("shared.safetensors_writer", t_ours)):
        print(f"{name:<28}{t:8.2f}{tensor_bytes(sd) / 1e9 / t:8.2f}")
    print(f"ratio save_file / ours: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
