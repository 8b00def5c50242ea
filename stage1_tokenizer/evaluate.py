"""Evaluate a tokenizer checkpoint: PSNR, SSIM, LPIPS, codebook usage / perplexity and rFID (reference §5).

    python -m stage1_tokenizer.evaluate --ckpt runs/tok/final --data /data/imagenet/val --resolution 256 \
        [--inception weights-inception-2015-12-05-6726825d.pth] [--lpips-weights vgg16-397923af.pth] \
        [--limit 5000] --out results.json

Images: shorter side resized to R, centre crop, [-1, 1]; reconstructions clamped to [-1, 1]. rFID compares the
originals with their reconstructions (no external statistics), as the official script does.

Metrics whose network weights are not on this machine (LPIPS trunks, InceptionV3) are reported as
unavailable with the reason; ``--require lpips,rfid`` turns that into an error.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from shared import atomic
from shared.runlog import get_logger, progress
from stage1_tokenizer.metrics import (CodebookCounter, InceptionFeatures, InceptionWeightsMissing, fid_from_features,
                                      psnr_per_image, ssim_per_image, to_uint8)

log = get_logger("stage1.evaluate")
OPTIONAL = ("lpips_vgg", "lpips_alex", "rfid")


@torch.no_grad()
def evaluate_tokenizer(tok, loader, device: torch.device, lpips: Optional[Dict[str, Any]] = None,
                       inception: Optional[InceptionFeatures] = None, precision: str = "fp32",
                       show_progress: bool = False) -> Dict[str, Any]:
    """Run ``tok`` (a Tokenizer) over ``loader`` and return every metric that has what it needs.

    ``lpips`` maps names (e.g. "lpips_vgg") to FrozenLPIPS modules.
    """
    was_training = tok.training
    tok.eval()
    counter = CodebookCounter(tok.bits)
    psnr: List[torch.Tensor] = []
    ssim: List[torch.Tensor] = []
    lp: Dict[str, List[torch.Tensor]] = {k: [] for k in (lpips or {})}
    feats_real: List[torch.Tensor] = []
    feats_fake: List[torch.Tensor] = []
    for batch in progress(loader, 0 if show_progress else 1, desc="evaluate"):
        x = batch["image"].to(device)
        idx = tok.encode(x, precision=precision)
        rec = tok.decode(idx, precision=precision).float().clamp(-1, 1)
        counter.update(idx)
        a, b = to_uint8(x).cpu(), to_uint8(rec).cpu()
        psnr.append(psnr_per_image(a, b))
        ssim.append(ssim_per_image(a, b))
        for name, net in (lpips or {}).items():
            lp[name].append(net(x, rec).cpu())
        if inception is not None:
            feats_real.append(inception(a.to(device)).cpu())
            feats_fake.append(inception(b.to(device)).cpu())
    tok.train(was_training)
    n = sum(len(p) for p in psnr)
    if n == 0:
        raise ValueError("no images to evaluate")
    out: Dict[str, Any] = {
        "images": n,
        "psnr": float(torch.cat(psnr).mean()),
        "ssim": float(torch.cat(ssim).mean()),
        "codebook_usage": counter.usage(),
        "codes_used": int((counter.counts > 0).sum()),
        "perplexity": counter.perplexity(),
        "tokens": counter.total,
    }
    for name, vals in lp.items():
        out[name] = float(torch.cat(vals).mean())
    if inception is not None:
        if n < 2:
            raise ValueError("rFID needs at least 2 images")
        out["rfid"] = fid_from_features(torch.cat(feats_real).numpy(), torch.cat(feats_fake).numpy())
    return out


def format_table(results: Dict[str, Any]) -> str:
    rows = []
    for k, v in results.items():
        if k in ("unavailable", "config"):
            continue
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    for k, why in results.get("unavailable", {}).items():
        rows.append((k, f"unavailable: {why}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m stage1_tokenizer.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="tokenizer checkpoint directory (e.g. RUN/final)")
    p.add_argument("--data", required=True, help="image folder (root/<class>/<img> or plain)")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--inception", default=None, help="FID InceptionV3 weights (torch-fidelity format)")
    p.add_argument("--lpips-weights", default=None, help="VGG16 trunk for LPIPS-VGG (torchvision vgg16-397923af.pth)")
    p.add_argument("--lpips-alex-weights", default=None, help="AlexNet trunk for LPIPS-Alex (alexnet-owt-7be5be79.pth)")
    p.add_argument("--require", default="", help="comma list of metrics that must be computed: lpips_vgg,lpips_alex,rfid")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from shared.checkpoint import CheckpointError
    from shared.device import device_type
    from stage1_tokenizer.data import ImageFolderDataset, make_eval_loader
    from stage1_tokenizer.losses import FrozenLPIPS, LPIPSWeightsMissing
    from stage1_tokenizer.tokenizer import Tokenizer

    required = {r.strip() for r in args.require.split(",") if r.strip()}
    if required - set(OPTIONAL):
        raise SystemExit(f"error: --require takes {', '.join(OPTIONAL)}, got {', '.join(sorted(required - set(OPTIONAL)))}")
    device = torch.device(device_type(args.device))
    try:
        tok = Tokenizer.from_checkpoint(args.ckpt, device=device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load tokenizer from {args.ckpt}: {e}")
    if args.resolution % tok.downsample_factor:
        raise SystemExit(f"error: --resolution {args.resolution} is not a multiple of the tokenizer's factor {tok.downsample_factor}")
    try:
        dataset = ImageFolderDataset(Path(args.data), args.resolution, train=False)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    loader = make_eval_loader(dataset, args.batch_size, args.workers, limit=args.limit)

    unavailable: Dict[str, str] = {}
    lpips_nets: Dict[str, Any] = {}
    for name, net, path in (("lpips_vgg", "vgg", args.lpips_weights), ("lpips_alex", "alex", args.lpips_alex_weights)):
        if net == "alex" and args.resolution < 32:  # AlexNet's pooling stack needs at least 32 px
            unavailable[name] = f"LPIPS-Alex needs images of at least 32 px, got {args.resolution}"
            continue
        try:
            lpips_nets[name] = FrozenLPIPS(net, path).to(device)
        except LPIPSWeightsMissing as e:
            unavailable[name] = str(e)
    inception = None
    try:
        inception = InceptionFeatures(args.inception).to(device)
    except InceptionWeightsMissing as e:
        unavailable["rfid"] = str(e)
    missing = required & set(unavailable)
    if missing:
        raise SystemExit("error: " + "; ".join(unavailable[m] for m in sorted(missing)))

    t0 = time.time()
    results = evaluate_tokenizer(tok, loader, device, lpips_nets, inception, args.precision, show_progress=True)
    results["seconds"] = round(time.time() - t0, 2)
    results["unavailable"] = unavailable
    results["config"] = {"ckpt": str(args.ckpt), "data": str(args.data), "resolution": args.resolution,
                         "limit": args.limit, "precision": args.precision, "preset": tok.cfg.preset}
    print(format_table(results))
    if args.out:
        atomic.write_text(Path(args.out), json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
