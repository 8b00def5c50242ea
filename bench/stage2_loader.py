"""Stage-2 loader throughput with shard verification (sha1 against index.json) vs without, same run.

    python bench/stage2_loader.py [--images 40000] [--workers 0] [--repeat 5]

Writes a synthetic token dataset (16x16 grid of 18-bit tokens, zstd MDS shards of 256 KB), then reads one
epoch through ``stage2_ar.data.build_loader`` (micro-batches of 64, the trainer's loader) twice per repeat:
- cold: an empty cache, so every shard is copied, checked and decompressed (a run's first epoch);
- warm: the cache of the cold pass reopened (a resumed or second run: copies already there are checked at
  opening).
The baseline is the same loader with Streaming's plain ``Stream`` (no checksum anywhere). Prints the best
CPU seconds per epoch of each (the loader in this process, its download threads included: CPU time, unlike
wall time, holds still on a machine other jobs share) and the cost of verification as a share of the
baseline's; and the hashing itself, timed alone (sha1 of every compressed shard, what the cold epoch adds, and
of every decompressed copy, what reopening adds), as a share of the baseline epoch.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming import Stream  # noqa: E402

from shared.token_dataset import read_manifest, reader  # noqa: E402
from shared.token_dataset.writer import write_dataset  # noqa: E402
from stage2_ar.data import TokenLayout, build_loader  # noqa: E402

VERIFIED = reader.VerifiedStream


class PlainStream(Stream):
    """Streaming's own stream, no checksum: the baseline."""

    def __init__(self, *, retry_seconds: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)


def epoch_seconds(data: str, cache: Path, workers: int, verified: bool) -> float:
    reader.VerifiedStream = VERIFIED if verified else PlainStream
    try:
        t = time.process_time()
        loader = build_loader(data, split="train", batch_size=64, layout=TokenLayout.from_manifest(read_manifest(data)),
                              num_workers=workers, cache_dir=str(cache), shuffle=True)
        n = sum(len(b[1]) for b in loader)
        seconds = time.process_time() - t
    finally:
        reader.VerifiedStream = VERIFIED
    assert n == (loader.dataset.num_samples // 64) * 64, n
    return seconds


def hash_seconds(files, repeat: int) -> float:
    files, best = list(files), float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for f in files:
            reader._sha(str(f))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--workers", type=int, default=0, help="0: CPU time covers the whole loader")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 1 << 18, (a.images, 256))
        write_dataset(root / "ds", {"train": (tokens, np.arange(a.images) % 1000)}, grid=(16, 16),
                      classes=[f"c{i}" for i in range(1000)], resolution=256, shard_bytes=1 << 18,
                      tokenizer={"preset": "synthetic", "config": {}, "checkpoint_sha256": "0" * 64})
        data = str(root / "ds")
        shards = len(list((root / "ds" / "mds" / "train").rglob("*.zstd")))
        best = {}
        hashed = {}
        for i in range(a.repeat):
            for verified in ((False, True) if i % 2 == 0 else (True, False)):  # drift hits both alike
                cache = root / f"cache-{i}-{int(verified)}"
                cold = epoch_seconds(data, cache, a.workers, verified)
                warm = epoch_seconds(data, cache, a.workers, verified)
                for kind, s in (("cold", cold), ("warm", warm)):
                    key = (kind, verified)
                    best[key] = min(best.get(key, float("inf")), s)
                if not hashed:
                    hashed = {"cold": hash_seconds((root / "ds" / "mds" / "train").rglob("*.zstd"), a.repeat),
                              "warm": hash_seconds((cache / "train").rglob("*.mds"), a.repeat)}
                shutil.rmtree(cache)
        print(f"Stage-2 loader, {a.images:,} images x 256 tokens (18-bit) in {shards} zstd shards, micro-batch 64, "
              f"{a.workers} workers, best of {a.repeat}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores")
        print(f"{'epoch':6s} {'no check':>11s} {'verified':>11s} {'difference':>11s} {'sha1 alone':>13s} "
              f"{'sha1 share':>11s}")
        for kind in ("cold", "warm"):
            base, ours = best[(kind, False)], best[(kind, True)]
            print(f"{kind:6s} {base:11.2f} {ours:11.2f} {100 * (ours / base - 1):+10.1f}% {hashed[kind]:13.3f} "
                  f"{100 * hashed[kind] / base:10.2f}%")
        print("CPU seconds per epoch; difference: verified vs unverified loader; sha1 share: the hashing "
              "verification adds, timed alone, over the unverified epoch (goal for both: < 5%)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
