"""Tokenizer encode throughput: eager fp32 vs our fast path (inference mode, channels_last, bf16 autocast).

    python bench/tokenizer_encode.py [--preset tokenizer-16x-256] [--res 256] [--batch 8] [--repeats 2]

Random weights (speed does not depend on them) and random images. Reported: images/s of ``encode`` for each
path, the speed-up, and how many tokens / bits the fast path reproduces exactly (bf16 can flip bits whose
latent is within rounding of 0; with trained weights most latents are far from 0).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared.tokens import index_to_bits  # noqa: E402
from stage1_tokenizer.config import PRESETS  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402


def eager_fp32_encode(tok: Tokenizer, x: torch.Tensor) -> torch.Tensor:
    """The plain baseline: autograd on, NCHW, fp32."""
    z = tok.encoder(x)
    return tok.quantizer.indices(z.detach())


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tokenizer-16x-256", choices=sorted(PRESETS))
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Tokenizer(PRESETS[args.preset]).eval()
    fast = Tokenizer(PRESETS[args.preset])
    fast.load_state_dict(base.state_dict())
    fast.eval().channels_last()
    x = torch.rand(args.batch, 3, args.res, args.res) * 2 - 1

    eager_fp32_encode(base, x[:1])  # warm-up (allocator, kernel selection)
    fast.encode(x[:1], precision="bf16")
    t_eager, idx_eager = timed(lambda: eager_fp32_encode(base, x), args.repeats)
    t_cl, idx_cl = timed(lambda: fast.encode(x), args.repeats)
    t_fast, idx_fast = timed(lambda: fast.encode(x, precision="bf16"), args.repeats)

    same_tok = lambda a: (a == idx_eager).float().mean().item()
    same_bit = lambda a: (index_to_bits(a, 18) == index_to_bits(idx_eager, 18)).float().mean().item()
    b = args.batch
    print(f"# encode {args.preset} at {args.res}px, batch {b}, {args.threads} thread(s), torch {torch.__version__}")
    print("| path | images/s | speed-up | identical tokens | identical bits |")
    print("|---|---|---|---|---|")
    print(f"| eager fp32 (autograd on, NCHW) | {b / t_eager:.3f} | 1.00x | 100% | 100% |")
    print(f"| inference_mode + channels_last, fp32 | {b / t_cl:.3f} | {t_eager / t_cl:.2f}x "
          f"| {100 * same_tok(idx_cl):.2f}% | {100 * same_bit(idx_cl):.3f}% |")
    print(f"| inference_mode + channels_last + bf16 autocast | {b / t_fast:.3f} | {t_eager / t_fast:.2f}x "
          f"| {100 * same_tok(idx_fast):.2f}% | {100 * same_bit(idx_fast):.3f}% |")


if __name__ == "__main__":
    main()
