"""The prepared GPU check: one command on one CUDA GPU, one table.

    python bench/gpu_check.py                 # one CUDA GPU, from a fresh checkout after `make setup` (<= 8 min)
    python bench/gpu_check.py --smoke         # the same code path at tiny sizes on CPU (run by the test suite)

Rows (each a measurement of this run against a baseline of the same run):
  1. trainers under a one-rank NCCL torchrun (bench/gpu_collectives.py): a few steps of each trainer on CUDA,
     proving every collective is handed device tensors (gloo on CPU in smoke mode);
  2. AR-B (343M) train step, bf16 autocast: eager vs compiled blocks, tokens/s and MFU;
  3. AR-B sampling with CFG, batch 64, 256 tokens: eager KV-cache loop vs the static decode step captured as
     CUDA graphs (torch.compile mode="reduce-overhead"), images/s, greedy tokens identical;
  4. tokenizer-16x-256 encode, batch 64: fp32 eager (NCHW) vs channels_last vs channels_last + bf16, images/s
     and token agreement with fp32 eager.

Model FLOPs for MFU (per optimizer step, fwd + bwd = 3 x forward, a matmul of an m x k by k x n = 2mkn):
  6 x (inter-block params x B*T  +  intra-block params x B*T*M  +  head params x B*T)
  + attention scores and values: 12 x n_inter x dim x T x B*T  +  12 x n_intra x dim x M x B*T*M
with T = 256 positions, M = 2 sub-tokens; embeddings (lookups) are not counted, causal masking is not halved
(the PaLM convention). Peak: dense bf16 of the GPU (table below, or --peak-tflops).
Weights are random (speed does not depend on them); sampling margins of random weights are small, so the
greedy comparison reports the fraction of identical tokens.
Goals on an H200: compiled AR-B >= 45% MFU; graph-captured sampling >= 3x eager; encode >= 1,500 images/s bf16.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.device import autocast, synchronize  # noqa: E402
from stage1_tokenizer.config import PRESETS as TOK_PRESETS  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402
from stage2_ar.config import PRESETS as AR_PRESETS  # noqa: E402
from stage2_ar.generate import Sampler  # noqa: E402
from stage2_ar.model import FactorizedAR  # noqa: E402
from stage2_ar.parallelize import compile_blocks  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "L4": 121.0}


def peak_tflops(name: str, override: float) -> float:
    if override > 0:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def step_flops(model: FactorizedAR, batch: int) -> float:
    cfg = model.cfg
    T, M, D = cfg.num_tokens, len(cfg.bits), cfg.dim
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())
    tokens = batch * T
    dense = count(model.inter) * tokens + count(model.intra) * tokens * M + count(model.heads) * tokens
    attn = 12 * cfg.n_inter * D * T * tokens + 12 * cfg.n_intra * D * M * tokens * M
    return 6 * dense + attn


def timed(fn, device, warmup: int, iters: int):
    out = None
    for _ in range(warmup):
        out = fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    synchronize(device)
    return (time.perf_counter() - t0) / iters, out


def ar_train_step(cfg, device, precision: str, subs, labels, compile_kwargs=None):
    """A fresh AR model (blocks compiled when ``compile_kwargs`` is a dict) and its fwd + bwd + AdamW step."""
    model = FactorizedAR(cfg).to(device).train()
    if compile_kwargs is not None:
        compile_blocks(model, **compile_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with autocast(device, precision):
            loss = model.loss(subs, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def row_collectives(smoke: bool) -> dict:
    script = ROOT / "bench" / "gpu_collectives.py"
    args = [sys.executable, str(script)] + (["--smoke"] if smoke else [])
    t0 = time.time()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = (r.stdout + r.stderr).strip().splitlines()
    return {"row": "trainers, one-rank torchrun (collectives on the group's device)",
            "result": "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})",
            "detail": tail[-1] if tail else "", "seconds": round(time.time() - t0, 1), "ok": r.returncode == 0}


def row_train(device, preset: str, batch: int, precision: str, compile_kwargs: dict, peak: float, iters: int):
    torch.manual_seed(0)
    cfg = replace(AR_PRESETS[preset], class_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    subs = [torch.randint(0, v, (batch, cfg.num_tokens), generator=g).to(device) for v in cfg.vocab_sizes]
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    results = {}
    for name in ("eager", "compiled"):
        model, step = ar_train_step(cfg, device, precision, subs, labels,
                                    compile_kwargs if name == "compiled" else None)
        sec, _ = timed(step, device, warmup=3, iters=iters)
        flops = step_flops(model, batch)
        results[name] = {"tokens_per_s": batch * cfg.num_tokens / sec,
                         "mfu": flops / sec / (peak * 1e12) if peak else float("nan")}
        del model, step
    e, c = results["eager"], results["compiled"]
    mfu = lambda r: f"MFU {r['mfu']:.1%}" if peak else "MFU n/a"
    return {"row": f"{preset} train step, {precision}, batch {batch}",
            "result": f"eager {e['tokens_per_s']:,.0f} tok/s ({mfu(e)}), compiled {c['tokens_per_s']:,.0f} tok/s "
                      f"({mfu(c)}), {c['tokens_per_s'] / e['tokens_per_s']:.2f}x",
            "ok": True, "eager": e, "compiled": c}


def row_sample(device, preset: str, batch: int, precision: str, mode: str):
    torch.manual_seed(0)
    model = FactorizedAR(AR_PRESETS[preset]).to(device).eval()
    for h in model.heads:  # zero heads would make every logit equal
        torch.nn.init.normal_(h.weight, std=0.02)
    labels = torch.arange(batch, device=device) % model.cfg.num_classes
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]

    samplers = {False: Sampler(model), True: Sampler(model, static=True, compile=mode)}  # kept: graphs reused

    def run(static):
        with autocast(device, precision):
            return samplers[static].generate(labels, cfg_scales=(1.9, 2.0), generator=gens(), top_k=1)

    sec_e, tok_e = timed(lambda: run(False), device, warmup=1, iters=1)
    sec_g, tok_g = timed(lambda: run(True), device, warmup=2, iters=2)  # warm-up compiles and captures
    same = (tok_e == tok_g).float().mean().item()
    return {"row": f"{preset} sampling, CFG, batch {batch}, {model.cfg.num_tokens} tokens, {precision}",
            "result": f"eager {batch / sec_e:.2f} img/s, static {mode} {batch / sec_g:.2f} img/s, "
                      f"{sec_e / sec_g:.2f}x; greedy tokens identical: {same:.2%}",
            "ok": True, "speedup": sec_e / sec_g, "identical": same}


def row_encode(device, preset: str, batch: int, res: int):
    torch.manual_seed(0)
    base = Tokenizer(TOK_PRESETS[preset]).to(device).eval()
    fast = Tokenizer(TOK_PRESETS[preset]).to(device)
    fast.load_state_dict(base.state_dict())
    fast.eval().channels_last()
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    rows = {}
    for name, fn in (("fp32 eager", lambda: base.quantizer.indices(base.encoder(x).detach())),
                     ("channels_last", lambda: fast.encode(x)),
                     ("channels_last + bf16", lambda: fast.encode(x, precision="bf16"))):
        sec, idx = timed(fn, device, warmup=2, iters=3)
        rows[name] = (batch / sec, idx)
    ref = rows["fp32 eager"][1]
    text = ", ".join(f"{k} {v[0]:,.0f} img/s ({(v[1] == ref).float().mean().item():.2%} tokens)" for k, v in rows.items())
    return {"row": f"{preset} encode at {res}px, batch {batch}", "result": text, "ok": True,
            "images_per_s": {k: v[0] for k, v in rows.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, same code path (for the test suite)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak of the GPU (else from a table)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    if a.smoke:
        device, name = torch.device("cpu"), "CPU (smoke)"
        torch.set_num_threads(1)
        train = dict(preset="ar-tiny", batch=2, precision="fp32", compile_kwargs=dict(backend="eager"), iters=1)
        sample = dict(preset="ar-tiny", batch=2, precision="fp32", mode="eager")
        encode = dict(preset="tokenizer-tiny", batch=2, res=16)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device (use --smoke for the CPU run of the same code path)")
        device, name = torch.device("cuda", 0), torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        train = dict(preset="ar-B", batch=32, precision="bf16", compile_kwargs={}, iters=10)
        sample = dict(preset="ar-B", batch=64, precision="bf16", mode="reduce-overhead")
        encode = dict(preset="tokenizer-16x-256", batch=64, res=256)
    peak = peak_tflops(name, a.peak_tflops)
    print(f"# GPU check on {name}; torch {torch.__version__}; peak bf16 {peak or 'unknown'} TFLOPS", flush=True)
    rows = [row_collectives(a.smoke)]
    print(f"| {rows[-1]['row']} | {rows[-1]['result']} |", flush=True)
    for fn, kw in ((row_train, {**train, "peak": peak}), (row_sample, sample), (row_encode, encode)):
        t0 = time.time()
        try:
            rows.append(fn(device, **kw))
        except Exception as e:  # one failing row must not hide the others
            rows.append({"row": fn.__name__, "result": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                         "ok": False})
        rows[-1]["seconds"] = round(time.time() - t0, 1)
        print(f"| {rows[-1]['row']} | {rows[-1]['result']} |", flush=True)
    print("\n| check | result | s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['result']} | {r.get('seconds', '')} |")
    if a.json:
        a.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2, default=float) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
