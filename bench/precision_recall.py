"""Precision / recall at the protocol size (50,000 x 2,048): row blocks vs the full N x N distance matrix.

    python bench/precision_recall.py [--n 50000] [--baseline-n 5000] [--dim 2048] [--threads 2] [--quick]

``shared.feature_metrics.precision_recall`` (k = 3) computes squared distances in float32 row blocks and
settles the decisions its rounding could change in float64; the baseline is the full float64 distance matrix
(``torch.cdist`` + k-th value per row + coverage against the whole matrix), the implementation it replaced.
The baseline runs at ``--baseline-n``, a size it can afford (its N x N matrix alone is N^2 x 8 bytes: 20 GB at
50,000), and both methods run there: same results, time and memory ratios. Then the blocks alone run at --n.
``--quick`` (what ``bench/run_all.py`` runs) stops after the baseline size.

Features are random, not Inception's: real = relu(z W), fake = relu((0.9 z + 0.2) W) with z ~ N(0, I_64)
and a fixed W (64 x dim), float32 values held as float64 (what the Inception path returns). Each measurement
runs in a fresh child process: time is the call's wall time; peak memory is the growth of the process's
maximum resident set (ru_maxrss) during the call, over the features already in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared.feature_metrics import precision_recall  # noqa: E402

K = 3


def features(n: int, dim: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, dim, generator=g) / 8
    real = torch.relu(torch.randn(n, 64, generator=g) @ w).double()
    fake = torch.relu((torch.randn(n, 64, generator=g) * 0.9 + 0.2) @ w).double()
    return real, fake


def full_matrix(real: torch.Tensor, fake: torch.Tensor, k: int = K):
    """The baseline, as the replaced code did it: each radius from the whole float64 N x N matrix (cdist over
    row slices, concatenated), coverage one 4096-row slice at a time."""
    def dist(a, b):
        return torch.cat([torch.cdist(a[i:i + 4096], b) for i in range(0, len(a), 4096)])

    def cover(points, centres, radii):
        inside = [(torch.cdist(points[i:i + 4096], centres) <= radii[None]).any(1) for i in range(0, len(points), 4096)]
        return float(torch.cat(inside).double().mean())

    r_real = dist(real, real).kthvalue(k + 1, dim=1).values
    r_fake = dist(fake, fake).kthvalue(k + 1, dim=1).values
    return {"precision": cover(fake, real, r_real), "recall": cover(real, fake, r_fake)}


def child(method: str, n: int, dim: int, threads: int) -> None:
    torch.set_num_threads(threads)
    real, fake = features(n, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out = full_matrix(real, fake) if method == "full" else precision_recall(real, fake, K)
    seconds = time.perf_counter() - t
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux
    print(json.dumps({**out, "seconds": seconds, "peak_bytes": peak}))


def measure(method: str, n: int, dim: int, threads: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", method, "--n", str(n), "--dim", str(dim),
                        "--threads", str(threads)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{method} at N={n} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="points per set for the blocks alone")
    p.add_argument("--baseline-n", type=int, default=5_000, help="points per set where both methods run")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="only the baseline size")
    p.add_argument("--child", choices=("full", "blocks"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.n, a.dim, a.threads)
    print(f"precision/recall, k={K}, {a.dim}-d random features (not Inception's), real and fake sets of N each; "
          f"{platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}")
    print("| method | N | seconds | peak memory | precision | recall |")
    print("|---|---|---|---|---|---|")
    row = lambda name, n, m: print(f"| {name} | {n:,} | {m['seconds']:.1f} | {gib(m['peak_bytes'])} "
                                   f"| {m['precision']:.4f} | {m['recall']:.4f} |")
    base = measure("full", a.baseline_n, a.dim, a.threads)
    row("full N x N float64 matrix (baseline)", a.baseline_n, base)
    ours = measure("blocks", a.baseline_n, a.dim, a.threads)
    row("row blocks, float32 + float64 ties", a.baseline_n, ours)
    big = None
    if not a.quick and a.n != a.baseline_n:
        big = measure("blocks", a.n, a.dim, a.threads)
        row("row blocks, float32 + float64 ties", a.n, big)
    same = ours["precision"] == base["precision"] and ours["recall"] == base["recall"]
    print(f"\nat N={a.baseline_n:,}: same precision and recall as the full matrix: {same}; "
          f"memory ratio (full / blocks) {base['peak_bytes'] / max(ours['peak_bytes'], 1):.1f}x, "
          f"time ratio (full / blocks) {base['seconds'] / ours['seconds']:.2f}x")
    if big is not None:
        est = base["peak_bytes"] * (a.n / a.baseline_n) ** 2  # the baseline's memory is its N x N matrices
        print(f"at N={a.n:,}: blocks peak {gib(big['peak_bytes'])}; the full matrix (not run) would need "
              f"{gib(8.0 * a.n ** 2)} for one N x N float64 matrix, ~{gib(est)} at its measured N^2 scaling: "
              f"~{est / max(big['peak_bytes'], 1):.0f}x")


if __name__ == "__main__":
    main()
