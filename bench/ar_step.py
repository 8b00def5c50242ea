"""AR training-step throughput (forward + backward + AdamW step), tokens/s, on a mid-size config.

Ours: the factorized model (inter trunk + intra transformer + 64- and 4096-way heads). Baseline, same run,
same trunk and batch: a plain next-token model with one flat 2^18-way head over the inter output (what the
factorization replaces: a 2^18 x D head and softmax). The ratio is ours / baseline in tokens per second.

    python bench/ar_step.py [--dim 384 --heads 6 --n-inter 6 --n-intra 2 --batch 2 --grid 16 --steps 2 --threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage2_ar.config import ARConfig  # noqa: E402
from stage2_ar.model import FactorizedAR  # noqa: E402


class FlatHeadAR(nn.Module):
    """Baseline: the same inter trunk, one Linear(D, 2^18) head, one cross-entropy over full tokens."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.trunk = FactorizedAR(cfg)
        self.head = nn.Linear(cfg.dim, 1 << sum(cfg.bits), bias=False)

    def loss(self, subtokens, labels):
        t = self.trunk
        tok = t.embed(subtokens)
        x = torch.cat([t.class_emb(labels)[:, None], tok[:, :-1]], 1)
        h = t.norm(t.run_inter(t.drop(x)))
        return F.cross_entropy(self.head(h).flatten(0, 1), t.join(subtokens).flatten())


def time_steps(model, loss_fn, batch, steps: int) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):  # first step warms up allocators and kernels
        t0 = time.perf_counter()
        loss = loss_fn(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--n-inter", type=int, default=6)
    ap.add_argument("--n-intra", type=int, default=2)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ARConfig(grid=(a.grid, a.grid), dim=a.dim, n_head=a.heads, n_inter=a.n_inter, n_intra=a.n_intra)
    subs = tuple(torch.randint(0, v, (a.batch, cfg.num_tokens)) for v in cfg.vocab_sizes)
    labels = torch.randint(0, cfg.num_classes, (a.batch,))
    ours = FactorizedAR(cfg).train()
    base = FlatHeadAR(cfg).train()
    for p in base.trunk.intra.parameters():  # not part of the baseline's compute
        p.requires_grad_(False)
    for p in list(base.trunk.heads.parameters()):
        p.requires_grad_(False)
    n_tok = a.batch * cfg.num_tokens
    t_ours = time_steps(ours, ours.loss, (subs, labels), a.steps)
    t_base = time_steps(base, base.loss, (subs, labels), a.steps)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_base = sum(p.numel() for p in base.parameters() if p.requires_grad)
    print(f"AR train step (fwd+bwd+AdamW), dim {a.dim}, heads {a.heads}, inter {a.n_inter}, intra {a.n_intra}, "
          f"grid {a.grid}x{a.grid}, batch {a.batch} ({n_tok} tokens), fp32; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}")
    print(f"{'model':34s} {'params':>12s} {'s/step':>8s} {'tokens/s':>9s}")
    print(f"{'factorized (6+12 bits, intra)':34s} {n_ours:12,d} {t_ours:8.3f} {n_tok / t_ours:9.1f}")
    print(f"{'baseline flat 2^18 head':34s} {n_base:12,d} {t_base:8.3f} {n_tok / t_base:9.1f}")
    print(f"ratio (factorized / flat, tokens/s): {t_base / t_ours:.2f}x")


if __name__ == "__main__":
    main()
