"""Evaluate a tokenizer checkpoint: PSNR, SSIM, LPIPS, codebook usage / perplexity and rFID (reference §5).

    python -m stage1_tokenizer.evaluate --ckpt runs/tok/final --data /data/imagenet/val --resolution 256 \
        [--inception pt_inception-2015-12-05-6726825d.pth] [--lpips-weights vgg16-397923af.pth] \
        [--limit 5000] --out results.json
    python -m stage1_tokenizer.evaluate --tokenizer hf://TencentARC/Open-MAGVIT2-Tokenizer-256-resolution ...

The tokenizer (``--ckpt`` or ``--tokenizer``) is any model reference (``shared.model_ref``); the results'
config records where it came from (``tokenizer_source``: file sha256, Hub repo and commit).

Images: shorter side resized to R, centre crop, [-1, 1]; reconstructions clamped to [-1, 1]; both converted
to uint8 by ``shared.images.to_uint8`` for every metric. rFID compares the originals with their
reconstructions (no external statistics), as the official script does, through ``shared.inception`` and
``shared.feature_metrics`` (the Stage-2 FID's path). Without --inception the weights are looked up at
$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth.

Under torchrun (``torchrun --nproc_per_node N -m stage1_tokenizer.evaluate ...``) every rank encodes and
decodes its share of the images (image i on rank i % N); the PSNR / SSIM / LPIPS sums, the image count and
the code histogram are summed over the ranks and the Inception features gathered for the rFID, so the
numbers are one process's; rank 0 prints and writes them.

Metrics whose network weights are not on this machine (LPIPS trunks, InceptionV3) are reported as
unavailable with the reason; ``--require lpips,rfid`` turns that into an error.
"""
from __future__ import annotations

import argparse


def _parser() -> argparse.ArgumentParser:
    """The command line (light: built and parsed before the heavy imports below)."""
    p = argparse.ArgumentParser(prog="python -m stage1_tokenizer.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", "--tokenizer", dest="ckpt", required=True,
                   help="the tokenizer: a checkpoint directory (e.g. RUN/final), an official .ckpt, or "
                        "hf://ORG/REPO[/FILE][@REVISION] (official files are converted once and cached)")
    p.add_argument("--data", required=True, help="image folder (root/<class>/<img> or plain)")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="FID InceptionV3 weights, the pt_inception-*.pth file (default: $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--lpips-weights", default=None, help="VGG16 trunk for LPIPS-VGG (torchvision vgg16-397923af.pth)")
    p.add_argument("--lpips-alex-weights", default=None, help="AlexNet trunk for LPIPS-Alex (alexnet-owt-7be5be79.pth)")
    p.add_argument("--require", default="", help="comma list of metrics that must be computed: lpips_vgg,lpips_alex,rfid")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here (a new file, or this tool's results)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not this tool's results")
    return p


if __name__ == "__main__":  # --help and argument errors answer before the heavy imports below
    _parser().parse_args()

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from shared import atomic
from shared import collectives
from shared import inception as inc
from shared.device import DistInfo
from shared.feature_metrics import fid_from_features
from shared.images import to_uint8
from shared.runlog import get_logger, progress
from stage1_tokenizer.metrics import CodebookCounter, psnr_per_image, ssim_per_image

log = get_logger("stage1.evaluate")
OPTIONAL = ("lpips_vgg", "lpips_alex", "rfid")


@torch.no_grad()
def evaluate_tokenizer(tok, loader, device: torch.device, lpips: Optional[Dict[str, Any]] = None,
                       inception: Optional[inc.FeatureFn] = None, precision: str = "fp32",
                       show_progress: bool = False, info: Optional[DistInfo] = None) -> Dict[str, Any]:
    """Run ``tok`` (a Tokenizer) over ``loader`` and return every metric that has what it needs.

    ``lpips`` maps names (e.g. "lpips_vgg") to FrozenLPIPS modules; ``inception`` is a feature function
    (``shared.inception.load_inception``), its "pool" features give the rFID. With ``info`` of a process
    group, each rank's ``loader`` holds its share of the images (``make_eval_loader(..., rank, world_size)``):
    the metric sums, image count and code histogram are summed over ranks and the Inception features
    gathered in dataset-index order (the batches' "index"), so every rank returns the numbers of one process
    over all the images (the rFID is computed on rank 0).
    """
    was_training = tok.training
    tok.eval()
    counter = CodebookCounter(tok.bits)
    names = sorted(lpips or {})
    sums = torch.zeros(3 + len(names), dtype=torch.float64)  # images, PSNR, SSIM, each LPIPS: summed per image
    feats_real: List[torch.Tensor] = []
    feats_fake: List[torch.Tensor] = []
    order: List[torch.Tensor] = []
    sharded = info is not None and info.distributed
    for batch in progress(loader, 0 if show_progress else 1, desc="evaluate"):
        x = batch["image"].to(device)
        idx = tok.encode(x, precision=precision)
        rec = tok.decode(idx, precision=precision).float().clamp(-1, 1)
        counter.update(idx)
        a, b = to_uint8(x).cpu(), to_uint8(rec).cpu()
        sums[0] += len(a)
        sums[1] += psnr_per_image(a, b).double().sum()
        sums[2] += ssim_per_image(a, b).double().sum()
        for j, name in enumerate(names):
            sums[3 + j] += lpips[name](x, rec).double().sum().cpu()
        if inception is not None:
            feats_real.append(inception(a)["pool"])
            feats_fake.append(inception(b)["pool"])
            if sharded:
                order.append(batch["index"].reshape(-1).cpu())
    tok.train(was_training)
    if sharded:
        collectives.all_reduce_(sums)
        collectives.all_reduce_(counter.counts)
    n = int(sums[0])
    if n == 0:
        raise ValueError("no images to evaluate")
    out: Dict[str, Any] = {
        "images": n,
        "psnr": float(sums[1] / n),
        "ssim": float(sums[2] / n),
        "codebook_usage": counter.usage(),
        "codes_used": int((counter.counts > 0).sum()),
        "perplexity": counter.perplexity(),
        "tokens": counter.total,
    }
    for j, name in enumerate(names):
        out[name] = float(sums[3 + j] / n)
    if inception is not None:
        if n < 2:
            raise ValueError("rFID needs at least 2 images")
        # a rank without images sends an empty (0, 0) block; its width comes from the others
        real, fake = (torch.cat(f) if f else torch.zeros((0, 0), dtype=torch.float64) for f in (feats_real, feats_fake))
        if sharded:  # in one process's row order: the covariance sums then add up in the same order
            perm = torch.argsort(collectives.all_gather_rows(torch.cat(order + [torch.zeros(0, dtype=torch.int64)])),
                                 stable=True)
            real, fake = collectives.all_gather_rows(real)[perm], collectives.all_gather_rows(fake)[perm]
            rfid = fid_from_features(real, fake) if info.is_main else None
            out["rfid"] = collectives.broadcast_object(rfid)
        else:
            out["rfid"] = fid_from_features(real, fake)
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


def is_results_file(path: Path) -> bool:
    """Whether ``path`` holds results written by this tool (so ``--out`` may replace it)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"images", "psnr", "config"} <= set(data)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = _parser().parse_args(argv)

    from shared.atomic import check_output_file
    from shared.checkpoint import CheckpointError, error_line
    from shared.device import cleanup_distributed, init_distributed
    from stage1_tokenizer.data import ImageFolderDataset, make_eval_loader
    from stage1_tokenizer.losses import FrozenLPIPS, LPIPSWeightsMissing
    from stage1_tokenizer.tokenizer import Tokenizer

    # Everything a user typed is checked before the first image is encoded.
    required = {r.strip() for r in args.require.split(",") if r.strip()}
    if required - set(OPTIONAL):
        raise SystemExit(f"error: --require takes {', '.join(OPTIONAL)}, got {', '.join(sorted(required - set(OPTIONAL)))}")
    for name in ("resolution", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be positive, got {args.limit}")
    if args.workers < 0:
        raise SystemExit(f"error: --workers must be >= 0, got {args.workers}")
    try:
        if args.out:
            owned = (lambda _: True) if args.overwrite else is_results_file
            check_output_file(args.out, owned=owned, what="a results file of stage1_tokenizer.evaluate")
        was_active = collectives.active()
        info = init_distributed(args.device)  # one process unless started by torchrun: then a share each
        device = info.device
    except (RuntimeError, ValueError) as e:  # OutputError is a ValueError
        raise SystemExit(f"error: {e}") from None
    try:
        tok = Tokenizer.from_pretrained(args.ckpt, device=device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load tokenizer from {args.ckpt}: {e}")
    if args.resolution % tok.downsample_factor:
        raise SystemExit(f"error: --resolution {args.resolution} is not a multiple of the tokenizer's factor {tok.downsample_factor}")
    try:
        dataset = ImageFolderDataset(Path(args.data), args.resolution, train=False)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    loader = make_eval_loader(dataset, args.batch_size, args.workers, rank=info.rank, world_size=info.world_size,
                              limit=args.limit)
    n_images = min(len(dataset), args.limit or len(dataset))

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
        except Exception as e:  # a named trunk file that is damaged, refused or of another network
            raise SystemExit(f"error: {name}: cannot use {path}: {error_line(e)}") from None
    inception = None
    if n_images < 2:  # a covariance needs two images
        unavailable["rfid"] = f"rFID needs at least 2 images, the data gives {n_images}"
    else:
        try:
            inception = inc.load_inception(args.inception, device)
        except inc.InceptionWeightsMissing as e:
            unavailable["rfid"] = str(e)
    missing = required & set(unavailable)
    if missing:
        raise SystemExit("error: " + "; ".join(unavailable[m] for m in sorted(missing)))

    t0 = time.time()
    try:
        results = evaluate_tokenizer(tok, loader, device, lpips_nets, inception, args.precision,
                                     show_progress=info.is_main, info=info)
    except OSError as e:  # an image that cannot be read (the loader re-raises its worker's error)
        raise SystemExit(f"error: {args.data}: {error_line(e)}") from None
    results["seconds"] = round(time.time() - t0, 2)
    results["unavailable"] = unavailable
    results["config"] = {"ckpt": str(args.ckpt), "tokenizer_source": tok.provenance, "data": str(args.data),
                         "resolution": args.resolution, "limit": args.limit, "precision": args.precision, "preset": tok.cfg.preset,
                         "world_size": info.world_size}
    if info.distributed and not was_active:
        cleanup_distributed()
    if not info.is_main:
        return results  # the same numbers as rank 0's, which alone reports them
    print(format_table(results))
    if args.out:
        try:
            atomic.write_text(Path(args.out), json.dumps(results, indent=2) + "\n")
        except OSError as e:
            raise SystemExit(f"error: cannot write {args.out}: {e.strerror or e}") from None
    return results


if __name__ == "__main__":
    main()
