"""Generation evaluation: sample N images per class with fixed seeds, write the ADM .npz, score it.

    python -m stage2_ar.evaluate --ckpt AR_DIR --tokenizer TOK_DIR --per-class 50 \
        --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth --out DIR

Paper protocol (reference section 4/5): 50 samples x 1000 classes, the preset's CFG scales and temperatures,
top-k / top-p off, images saved as uint8 by (x + 1) / 2 * 255 with truncation. Batch i of the class-major
label list is drawn from a generator seeded with ``seed * 1_000_003 + i``: a run is reproducible for a
given --seed and --batch-size (the official script also seeds per chunk of 50).

Writes DIR/samples.npz (arr_0 images NHWC uint8, arr_1 labels) and DIR/metrics.json (FID, IS, precision,
recall and the settings). ``--samples NPZ`` skips generation and scores an existing batch.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from shared import atomic
from stage2_ar import gen_metrics as gm
from stage2_ar.sample import parse_floats, per_subtoken


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage2_ar.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="AR checkpoint directory (kind 'ar')")
    p.add_argument("--tokenizer", help="tokenizer checkpoint directory (kind 'tokenizer')")
    p.add_argument("--samples", help="score this ADM .npz instead of generating")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: all classes)")
    p.add_argument("--ref", required=True, help="reference batch: ADM .npz (arr_0) or a folder of images")
    p.add_argument("--inception", required=True, help="local InceptionV3 weights (torch-fidelity pt_inception-2015-12-05)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--cfg", default=None, help="CFG scale(s), one or one per sub-token (default: the checkpoint's)")
    p.add_argument("--temperature", default=None, help="temperature(s), one or one per sub-token")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or npu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--feature-batch", type=int, default=100, help="images per InceptionV3 forward")
    return p.parse_args(argv)


def batch_seed(seed: int, batch_index: int) -> int:
    return seed * 1_000_003 + batch_index


@torch.no_grad()
def generate_samples(model, tokenizer, labels: Sequence[int], *, batch_size: int, seed: int, device: torch.device,
                     precision: str = "fp32", cfg_scales=None, temperatures=None, top_k: int = 0,
                     top_p: float = 1.0, progress_rank: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 images for ``labels``, one seeded generator per batch."""
    from shared.device import autocast
    from shared.runlog import progress
    from stage2_ar.sample import generate, to_uint8_truncated

    labels = torch.as_tensor(list(labels), dtype=torch.long)
    out = []
    starts = range(0, len(labels), batch_size)
    for i, s in enumerate(progress(starts, rank=progress_rank, desc="sample")):
        gen = torch.Generator(device=device).manual_seed(batch_seed(seed, i))
        with autocast(device, precision):
            idx = generate(model, labels[s:s + batch_size].to(device), cfg_scales=cfg_scales,
                           temperatures=temperatures, top_k=top_k, top_p=top_p, generator=gen)
        out.append(to_uint8_truncated(tokenizer.decode(idx)))
    return np.concatenate(out)


def main(argv=None) -> int:
    args = _parse_args(argv)
    out = Path(args.out)
    if args.per_class < 1 or args.batch_size < 1:
        raise SystemExit("error: --per-class and --batch-size must be positive")
    if args.samples is None and (not args.ckpt or not args.tokenizer):
        raise SystemExit("error: give --ckpt and --tokenizer to generate, or --samples to score an existing .npz")
    # Fail on missing evaluation inputs before spending hours sampling.
    from shared.device import device_type

    try:
        device = torch.device(device_type(args.device))
        feature_fn = gm.inception_feature_fn(args.inception, device)
    except (gm.MetricsError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if not Path(args.ref).exists():
        raise SystemExit(f"error: reference {args.ref} does not exist")

    settings = {"seed": args.seed, "per_class": args.per_class, "batch_size": args.batch_size,
                "top_k": args.top_k, "top_p": args.top_p, "ref": str(args.ref)}
    if args.samples is not None:
        try:
            samples = gm.load_reference(args.samples)
        except gm.MetricsError as e:
            raise SystemExit(f"error: --samples: {e}") from None
        settings["samples"] = str(args.samples)
    else:
        from shared.checkpoint import CheckpointError
        from stage2_ar.model import FactorizedAR

        try:
            model = FactorizedAR.from_checkpoint(args.ckpt, device=device)
        except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot load AR checkpoint: {e}") from None
        try:
            from stage1_tokenizer.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_checkpoint(args.tokenizer, device=device).eval()
        except (ImportError, CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot load tokenizer checkpoint: {e}") from None
        m = len(model.cfg.bits)
        try:
            classes = (list(range(model.cfg.num_classes)) if args.classes is None
                       else [int(c) for c in args.classes.split(",") if c.strip()])
            scales = per_subtoken(parse_floats(args.cfg, "cfg"), m, "--cfg", model.cfg.cfg_scales or 1.0)
            temps = per_subtoken(parse_floats(args.temperature, "temperature"), m, "--temperature",
                                  model.cfg.temperatures or 1.0)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        bad = [c for c in classes if not 0 <= c < model.cfg.num_classes]
        if bad or not classes:
            raise SystemExit(f"error: classes must be a non-empty subset of [0, {model.cfg.num_classes}), got {bad or 'none'}")
        labels = np.repeat(np.asarray(classes, dtype=np.int64), args.per_class)  # class-major order
        t0 = time.time()
        samples = generate_samples(model, tokenizer, labels, batch_size=args.batch_size, seed=args.seed,
                                   device=device, precision=args.precision, cfg_scales=scales, temperatures=temps,
                                   top_k=args.top_k, top_p=args.top_p)
        settings.update({"ckpt": str(args.ckpt), "tokenizer": str(args.tokenizer), "cfg_scales": list(scales),
                         "temperatures": list(temps), "num_classes": len(classes),
                         "sampling_seconds": round(time.time() - t0, 1)})
        gm.save_npz(out / "samples.npz", samples, labels)
    try:
        reference = gm.load_reference(args.ref, size=samples.shape[1])
        metrics = gm.compute_metrics(samples, reference, feature_fn, batch_size=args.feature_batch)
    except gm.MetricsError as e:
        raise SystemExit(f"error: {e}") from None
    result = {**metrics, "settings": settings}
    atomic.write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items()}, indent=None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
