"""torch.compile vs eager on this machine: the AR training step (compiled blocks) and sampling (the static
decode step, compiled), same weights, same inputs, same seeds, in the same run.

    python bench/ar_compiled.py [--dim 256 --heads 4 --n-inter 4 --n-intra 2 --grid 8 --batch 4 --threads 2]

Compilation time is reported separately and excluded from the step times (it is paid once per run). On a
GPU the script uses it (bf16 autocast, sampling captured as CUDA graphs with mode="reduce-overhead").
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.device import autocast, device_type  # noqa: E402
from stage2_ar.config import ARConfig  # noqa: E402
from stage2_ar.generate import Sampler  # noqa: E402
from stage2_ar.model import FactorizedAR  # noqa: E402
from bench.gpu_check import ar_train_step, timed  # noqa: E402


def clock(fn, device, iters: int):
    """Seconds per call of ``fn`` (no warm-up: the first call is timed on its own by the caller)."""
    return timed(fn, device, warmup=0, iters=iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-inter", type=int, default=4)
    ap.add_argument("--n-intra", type=int, default=2)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(device_type())
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = ARConfig(grid=(a.grid, a.grid), dim=a.dim, n_head=a.heads, n_inter=a.n_inter, n_intra=a.n_intra,
                   class_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    subs = [torch.randint(0, v, (a.batch, cfg.num_tokens), generator=g).to(device) for v in cfg.vocab_sizes]
    labels = torch.randint(0, cfg.num_classes, (a.batch,), generator=g).to(device)

    # ---- training step
    train, losses = {}, {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        _, step = ar_train_step(cfg, device, precision, subs, labels, {} if name == "compiled" else None)
        first, loss0 = clock(step, device, 1)  # eager: warm-up; compiled: compilation + first step
        sec, _ = clock(step, device, a.steps)
        train[name], losses[name] = (first, sec), float(loss0)

    # ---- sampling
    torch.manual_seed(0)
    model = FactorizedAR(cfg).to(device).eval()
    for h in model.heads:
        torch.nn.init.normal_(h.weight, std=0.02)
    lab = torch.arange(a.batch, device=device) % cfg.num_classes
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(a.batch)]
    mode = "reduce-overhead" if device.type == "cuda" else "default"

    samplers = {False: Sampler(model), True: Sampler(model, static=True, compile=mode)}  # kept: graphs reused

    def sample(static):
        with autocast(device, precision):
            return samplers[static].generate(lab, cfg_scales=2.0, generator=gens())

    e_first, ref = clock(lambda: sample(False), device, 1)
    e_sec, _ = clock(lambda: sample(False), device, 2)
    c_first, out = clock(lambda: sample(True), device, 1)
    c_sec, out2 = clock(lambda: sample(True), device, 2)
    same = torch.equal(ref, out) and torch.equal(ref, out2)

    n = sum(p.numel() for p in model.parameters())
    print(f"AR compiled vs eager, {n:,} params (dim {a.dim}, inter {a.n_inter}, intra {a.n_intra}), grid "
          f"{a.grid}x{a.grid}, batch {a.batch}, {precision}; device {device.type}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}")
    tok = a.batch * cfg.num_tokens
    print(f"{'path':40s} {'first call s':>12s} {'s/call':>8s} {'rate':>14s}")
    for name in ("eager", "compiled"):
        first, sec = train[name]
        print(f"{'train step, ' + name:40s} {first:12.2f} {sec:8.3f} {tok / sec:9.1f} tok/s")
    print(f"{'sampling, eager KV cache':40s} {e_first:12.2f} {e_sec:8.3f} {a.batch / e_sec:9.3f} img/s")
    print(f"{'sampling, static decode compiled (' + mode + ')':40s} {c_first:12.2f} {c_sec:8.3f} {a.batch / c_sec:9.3f} img/s")
    print(f"ratio train (compiled / eager, tokens/s): {train['eager'][1] / train['compiled'][1]:.2f}x; "
          f"first-step loss eager {losses['eager']:.6f} compiled {losses['compiled']:.6f}")
    print(f"ratio sampling (compiled static / eager, images/s): {e_sec / c_sec:.2f}x; same tokens: {same}")
    if not same:
        raise SystemExit("error: the compiled sampler disagrees with the eager one")


if __name__ == "__main__":
    main()
