"""Token packing throughput: our grouped-shift packer vs a bit-expansion baseline (np.packbits), one core.

Prints MB/s of packed bytes each way for 18-bit tokens and the ratio to the baseline, and checks that both
produce the same bytes. Goal (foundation issue): >= 50 MB/s each way on one core.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from shared.tokens import pack_tokens, unpack_tokens


def baseline_pack(v: np.ndarray, k: int) -> np.ndarray:
    bits = ((v[:, None] >> np.arange(k)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def baseline_unpack(buf: np.ndarray, n: int, k: int) -> np.ndarray:
    bits = np.unpackbits(buf, bitorder="little", count=n * k).reshape(n, k).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(k, dtype=np.int64))


def best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens per run (256 per image)")
    ap.add_argument("--bits", type=int, default=18)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    v = np.random.default_rng(0).integers(0, 1 << a.bits, size=a.tokens)
    packed = pack_tokens(v, a.bits)
    assert np.array_equal(packed, baseline_pack(v, a.bits)), "packer disagrees with the baseline"
    assert np.array_equal(unpack_tokens(packed, a.tokens, a.bits), v)
    mb = packed.nbytes / 1e6
    rows = []
    for name, ours, base in (
        ("pack", lambda: pack_tokens(v, a.bits), lambda: baseline_pack(v, a.bits)),
        ("unpack", lambda: unpack_tokens(packed, a.tokens, a.bits), lambda: baseline_unpack(packed, a.tokens, a.bits)),
    ):
        t_ours, t_base = best_seconds(ours, a.repeat), best_seconds(base, a.repeat)
        rows.append((name, mb / t_ours, mb / t_base, t_base / t_ours))
    print(f"token codec, {a.tokens:,} x {a.bits}-bit tokens = {mb:.1f} MB packed; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'op':8s} {'ours MB/s':>10s} {'baseline MB/s':>14s} {'ratio':>7s}")
    for name, ours, base, ratio in rows:
        print(f"{name:8s} {ours:10.1f} {base:14.1f} {ratio:6.1f}x")


if __name__ == "__main__":
    main()
