"""LFQ entropy loss at K = 18: our exact factorised computation vs the full-softmax formulation.

    python bench/lfq_entropy.py [--ns 256,512,2048] [--threads 1]

For each token count N, both methods compute (per-sample entropy, codebook entropy) of the same latents and
back-propagate their difference (the entropy aux loss). Reported: forward+backward wall time, peak memory of
the tensors each method allocates (tracked op by op, the CPU analogue of CUDA's max_memory_allocated), the
ratios, and the error of each fp32 result (largest absolute error of the two values, largest gradient error
relative to the largest gradient) against our formula run in float64, which the tests hold equal to a
float64 full softmax. The full softmax materialises N x 2^18
probabilities several times (~1 MiB per token per copy); it is skipped for an N whose estimate does not
fit in the memory available now.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared.tokens import index_to_bits  # noqa: E402
from stage1_tokenizer.lfq import entropy_terms  # noqa: E402

K, TAU = 18, 0.01


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage created inside the block and still alive, and the peak of that number."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage pointer -> (weak ref, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[ptr]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                self.live.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def full_softmax(z: torch.Tensor):
    """The official formulation: a softmax over all 2^K codes for every token."""
    codes = index_to_bits(torch.arange(2 ** K), K, signed=True)  # (2^K, K) +-1, index order
    logits = 2 * z @ codes.T
    probs = torch.softmax(logits / TAU, -1)
    log_probs = torch.log_softmax(logits / TAU + 1e-5, -1)
    per_sample = -(probs * log_probs).sum(-1).mean()
    avg = probs.mean(0)
    codebook = -(avg * torch.log(avg + 1e-5)).sum()
    return per_sample, codebook


def ours(z: torch.Tensor):
    return entropy_terms(z, TAU)


def run(fn, z0: torch.Tensor):
    z = z0.clone().requires_grad_()
    with PeakTensorMemory() as mem:
        t = time.perf_counter()
        s, c = fn(z)
        (s - c).backward()
        dt = time.perf_counter() - t
    return dt, mem.peak, (s.item(), c.item()), z.grad


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", default="256,512,2048", help="token counts, comma separated")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of our method (median)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ns = [int(n) for n in args.ns.split(",")]
    print(f"# LFQ entropy, K={K}, tau={TAU}, fp32, {args.threads} thread(s), torch {torch.__version__}")
    print("| N | full softmax: time | peak mem | ours: time | peak mem | speed-up | memory ratio "
          "| value error: full / ours | grad error: full / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        g = torch.Generator().manual_seed(n)
        z0 = torch.randn(n, K, generator=g) * 0.02  # soft bits: both terms far from their extremes
        run(ours, z0)  # warm-up
        timed = [run(ours, z0) for _ in range(args.repeats)]
        t_ours = statistics.median(r[0] for r in timed)
        _, m_ours, v_ours, g_ours = timed[0]
        # float64 run of our (exact, brute-force-tested) formula: the reference both fp32 results are held to
        _, _, v64, g64 = run(ours, z0.double())
        err = lambda v, gr: (max(abs(a - b) for a, b in zip(v, v64)), ((gr - g64).abs().max() / g64.abs().max()).item())
        ev_ours, eg_ours = err(v_ours, g_ours)
        need = 6 * n * 2 ** K * 4  # ~6 live N x 2^K fp32 tensors at the peak of fwd+bwd
        if need > 0.8 * mem_available():
            print(f"| {n} | skipped (needs ~{fmt_bytes(need)}) | | {t_ours * 1e3:.1f} ms | {fmt_bytes(m_ours)} | | "
                  f"| - / {ev_ours:.1e} | - / {eg_ours:.1e} |")
            continue
        t_ref, m_ref, v_ref, g_ref = run(full_softmax, z0)
        ev_ref, eg_ref = err(v_ref, g_ref)
        print(f"| {n} | {t_ref:.2f} s | {fmt_bytes(m_ref)} | {t_ours * 1e3:.1f} ms | {fmt_bytes(m_ours)} "
              f"| {t_ref / t_ours:.0f}x | {m_ref / m_ours:.0f}x | {ev_ref:.1e} / {ev_ours:.1e} | {eg_ref:.1e} / {eg_ours:.1e} |")
        del g_ref


if __name__ == "__main__":
    main()
