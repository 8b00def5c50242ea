"""Tokenizer ablation runs: the project's trainer on photo crops, then held-out metrics of the EMA weights."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import torch

from experiments.presets import TokenizerAblation
from shared.runlog import read_metrics
from stage1_tokenizer.data import ImageFolderDataset, make_eval_loader
from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.metrics import CodebookCounter
from stage1_tokenizer.model import count_parameters
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.train import train
from stage1_tokenizer.train_config import PRESETS as TRAIN_PRESETS
from stage1_tokenizer.train_config import TrainConfig

CURVE_KEYS = ("val/psnr", "val/ssim", "val/codes_used", "g/l1")


def train_config(ab: TokenizerAblation, seed: int, photos: Path, out: Path, size: int) -> TrainConfig:
    base = TRAIN_PRESETS["tokenizer-demo"]
    return replace(
        base, model=ab.model(), seed=seed, device="cpu", precision="fp32", out_dir=str(out), resume="auto",
        max_steps=ab.steps, ckpt_every=ab.steps, keep_last=1, log_every=ab.log_every, image_every=0,
        val_every=ab.val_every, tensorboard=False, threads=1,
        # GAN off: the discriminator never steps (disc_start past the end), the generator sees no GAN term
        loss=replace(base.loss, perceptual_weight=0.0, disc_start=ab.steps + 1),
        optim=replace(base.optim, lr=ab.lr, ema_decay=ab.ema_decay),
        data=replace(base.data, root=str(photos / "train"), val_root=str(photos / "heldout"), val_images=1 << 30,
                     resolution=size, global_batch=ab.batch, micro_batch=ab.batch, num_workers=0),
    )


def images_of(folder: Path, size: int) -> torch.Tensor:
    """Every image of a folder, centre-cropped, (N, 3, size, size) in [-1, 1], in file order."""
    ds = ImageFolderDataset(folder, size, train=False)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def curves(metrics: List[Dict[str, Any]]) -> Dict[str, List[List[float]]]:
    """{key: [[step, value], ...]} for the keys the plots use."""
    return {k: [[r["step"], r[k]] for r in metrics if k in r] for k in CURVE_KEYS}


def run(ab: TokenizerAblation, seed: int, photos: Path, out: Path, size: int) -> Dict[str, Any]:
    cfg = train_config(ab, seed, photos, out, size)
    t0 = time.time()
    rc = train(cfg)
    minutes = (time.time() - t0) / 60
    if rc:
        raise RuntimeError(f"tokenizer training stopped with status {rc}")
    metrics = read_metrics(out / "metrics.jsonl")
    tok = Tokenizer.from_checkpoint(out / "final")
    held = make_eval_loader(ImageFolderDataset(photos / "heldout", size, train=False), batch_size=64)
    res = evaluate_tokenizer(tok, held, torch.device("cpu"))
    train_codes = CodebookCounter(tok.bits)
    for chunk in images_of(photos / "train", size).split(256):
        train_codes.update(tok.encode(chunk))
    grid = tok.latent_shape(size, size)
    return {
        "heldout_images": res["images"], "psnr": res["psnr"], "ssim": res["ssim"],
        "codebook_usage": res["codebook_usage"], "codes_used": res["codes_used"], "tokens": res["tokens"],
        "perplexity": res["perplexity"],
        # a held-out set of N tokens can show at most min(N, 2^K) codes: the fraction of that reachable maximum
        "usage_of_reachable": res["codes_used"] / min(res["tokens"], 2 ** tok.bits),
        "train_codebook_usage": train_codes.usage(), "train_tokens": train_codes.total,
        "train_perplexity": train_codes.perplexity(),
        "bits_per_image": grid[0] * grid[1] * tok.bits, "parameters": count_parameters(tok),
        "train_minutes": minutes,
        "curves": curves(metrics), "checkpoint": str(out / "final"),
    }
