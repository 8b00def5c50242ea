"""AR sampling throughput: KV-cache sampler vs recomputing the whole prefix at every step.

Same weights, same seeds, same settings (CFG on, so the batch is doubled): both samplers must produce the
same token grids (checked), and the ratio of images/s is printed. Token generation only; decoding with the
tokenizer costs the same for both and is left out.

    python bench/ar_sample.py [--dim 256 --heads 4 --n-inter 6 --n-intra 2 --grid 8 --batch 4 --threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage2_ar.config import ARConfig  # noqa: E402
from stage2_ar.generate import generate  # noqa: E402
from stage2_ar.model import FactorizedAR  # noqa: E402


def run(model, labels, use_cache: bool, seed: int, cfg_scale: float):
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    idx = generate(model, labels, cfg_scales=cfg_scale, generator=gen, use_cache=use_cache)
    return idx, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-inter", type=int, default=6)
    ap.add_argument("--n-intra", type=int, default=2)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ARConfig(grid=(a.grid, a.grid), dim=a.dim, n_head=a.heads, n_inter=a.n_inter, n_intra=a.n_intra)
    model = FactorizedAR(cfg).eval()
    for h in model.heads:  # untrained zero heads would sample uniformly; any weights do for timing
        torch.nn.init.normal_(h.weight, std=0.02)
    labels = torch.arange(a.batch) % cfg.num_classes
    run(model, labels[:1], True, a.seed, a.cfg)  # warm-up
    idx_c, t_c = run(model, labels, True, a.seed, a.cfg)
    idx_f, t_f = run(model, labels, False, a.seed, a.cfg)
    same = torch.equal(idx_c, idx_f)
    n = sum(p.numel() for p in model.parameters())
    print(f"AR sampling, {n:,} params (dim {a.dim}, inter {a.n_inter}, intra {a.n_intra}), grid {a.grid}x{a.grid}, "
          f"batch {a.batch} with CFG {a.cfg} (x2 rows), fp32; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {a.threads}")
    print(f"{'sampler':26s} {'seconds':>8s} {'images/s':>9s}")
    print(f"{'KV cache':26s} {t_c:8.2f} {a.batch / t_c:9.3f}")
    print(f"{'full-prefix recompute':26s} {t_f:8.2f} {a.batch / t_f:9.3f}")
    print(f"ratio (cache / recompute, images/s): {t_f / t_c:.2f}x; same tokens: {same}")
    if not same:
        raise SystemExit("error: the two samplers disagree")


if __name__ == "__main__":
    main()
