"""AR ablation runs: the token dataset (the project's own CLIs), training, held-out NLL and sample grids.

The dataset is written once by the real tools: ``python -m dataprep.fashion_mnist`` (image folders), then
``python -m dataprep.encode`` (the Ray job) for the train and the held-out split. Training reads the MDS
shards through the token datasets' reader (``shared.token_dataset.TokenDataset``) with the run's own
sub-token split (the dataset records (6, 12), which the project's trainer insists on; the tokens are the
same 18-bit indices whatever the split, so a (9, 9) model reads the very same rows). The splits are small
(a few MB), so they are read once into memory and batched from a seeded permutation: the run is a pure
function of its seed. Each step is the trainer's own (``stage2_ar.train.TrainStep``: one micro-batch per
step, fp32 on the CPU), fed from that permutation.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from experiments.presets import ARAblation, FashionData
from shared.device import DistInfo
from shared.runlog import image_grid, save_png
from shared.token_dataset import TokenDataset, read_manifest
from shared.tokens import split_index
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_ar import data as sdata
from stage2_ar.config import ARConfig
from stage2_ar.generate import generate_images
from stage2_ar.model import FactorizedAR, count_params
from stage2_ar.train import Batch, TrainStep, lr_schedule
from stage2_ar.train_config import DataConfig, OptimConfig, ScheduleConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
Split = Tuple[Tuple[torch.Tensor, ...], torch.Tensor]  # (sub-tokens (N, T) each, labels (N,))


def _cli(argv: List[str], log: Path) -> None:
    """A project CLI as a subprocess (as a user runs it); its output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed with status {r.returncode}; see {log}")


def build_dataset(fm: FashionData, fm_root: Path, tokenizer: Path, out: Path, cpus: int) -> Path:
    """OUT/fashion-mnist/{train,val}/<class>/*.png, then the token dataset OUT/tokens (both splits)."""
    images, tokens, log = out / "fashion-mnist", out / "tokens", out / "dataset.log"
    out.mkdir(parents=True, exist_ok=True)
    _cli(["-m", "dataprep.fashion_mnist", "--root", str(fm_root), "--out", str(images), "--per-class",
          str(fm.per_class), "--val-per-class", str(fm.val_per_class), "--size", str(fm.size)], log)
    for split in ("train", "val"):  # the job is resumable and does nothing on a finished split
        _cli(["-m", "dataprep.encode", "--data", str(images), "--split", split, "--tokenizer", str(tokenizer),
              "--out", str(tokens), "--resolution", str(fm.size), "--views", "center", "--batch-size", "64",
              "--num-cpus", str(cpus)], log)
    return tokens


def load_split(dataset: Path, split: str, bits: Sequence[int], cache: Path) -> Split:
    """Every image of a split (its view 0, in storage order) as sub-tokens of ``bits``, read through the token
    datasets' streaming reader (``cache``: its cache directories, one per split)."""
    stream = TokenDataset(dataset).streaming(split, cache / split, view=0, shuffle=False, batch_size=1)
    rows = [stream[i] for i in range(stream.num_samples)]
    idx = np.stack([r["tokens"].reshape(-1) for r in rows])
    subs = tuple(torch.from_numpy(np.ascontiguousarray(s)) for s in split_index(idx, bits))
    return subs, torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64)


@torch.no_grad()
def heldout_nll(model: FactorizedAR, split: Split, batch: int = 250) -> Dict[str, Any]:
    """Mean over held-out tokens of -log p(token) = sum over its sub-tokens of the cross-entropy (nats)."""
    was = model.training
    model.eval()
    subs, labels = split
    per_sub = torch.zeros(len(subs), dtype=torch.float64)
    for i in range(0, len(labels), batch):
        part = tuple(s[i:i + batch] for s in subs)
        logits = model(part, labels[i:i + batch])
        for m, (lg, st) in enumerate(zip(logits, part)):
            per_sub[m] += torch.nn.functional.cross_entropy(lg.flatten(0, 1).float(), st.flatten(),
                                                            reduction="sum").double()
    model.train(was)
    per_sub /= subs[0].numel()
    nats = float(per_sub.sum())
    return {"nll_nats": nats, "nll_bits": nats / math.log(2), "subtoken_nats": per_sub.tolist()}


def batches(split: Split, batch: int, seed: int) -> Iterator[Batch]:
    """Endless (sub-tokens, labels) batches from a fresh seeded permutation each epoch (the tail is dropped)."""
    subs, labels = split
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(labels), generator=g)
        for i in range(0, len(labels) - batch + 1, batch):
            idx = perm[i:i + batch]
            yield tuple(s[idx] for s in subs), labels[idx]


def train_config(ab: ARAblation, model: ARConfig) -> TrainConfig:
    """The ablation's recipe as the trainer's config: AdamW (0.9, 0.95), weight decay on every parameter, clip
    1, warm-up / hold / linear decay to 0.1x, one micro-batch of ``ab.batch`` per step, fp32 on one CPU."""
    return TrainConfig(model=model, precision="fp32", device="cpu",
                       optim=OptimConfig(lr=ab.lr, weight_decay=ab.weight_decay, decay="all", grad_clip=1.0),
                       schedule=ScheduleConfig(max_steps=ab.steps, warmup_steps=ab.warmup),
                       data=DataConfig(global_batch=ab.batch, micro_batch=ab.batch))


def sample_grid(model: FactorizedAR, tokenizer: Tokenizer, per_class: int, seed: int, path: Path) -> Path:
    """One row per class, CFG and temperatures from the model config, one seeded generator per image."""
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(per_class)
    images = generate_images(model, tokenizer, labels, seed=seed).images
    save_png(image_grid(images, nrow=per_class), path)
    return path


def reference(dataset: Path, images: Path, tokenizer: Path, per_class: int, size: int, path: Path) -> Dict[str, Any]:
    """What a perfect AR model could show: held-out tokens decoded (the first images of every class, one row
    per class), and how well the tokenizer reconstructs the held-out images (PSNR / SSIM)."""
    from stage1_tokenizer.data import ImageFolderDataset, make_eval_loader
    from stage1_tokenizer.evaluate import evaluate_tokenizer

    manifest = read_manifest(str(dataset))
    (idx,), labels = load_split(dataset, "val", (manifest.bits_per_token,), path.parent / "mds-cache")
    first = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(manifest.num_classes)])
    tok = Tokenizer.from_checkpoint(tokenizer)
    save_png(image_grid(tok.decode(idx[first].view(-1, *manifest.grid)).clamp(-1, 1), nrow=per_class), path)
    loader = make_eval_loader(ImageFolderDataset(images / "val", size, train=False), batch_size=100)
    res = evaluate_tokenizer(tok, loader, torch.device("cpu"))
    return {"grid": str(path), "psnr": res["psnr"], "ssim": res["ssim"], "images": res["images"]}


def run(ab: ARAblation, seed: int, dataset: Path, tokenizer: Path, out: Path) -> Dict[str, Any]:
    manifest = read_manifest(str(dataset))
    cfg = ab.model(manifest.grid, manifest.num_classes)
    cache = out / "mds-cache"
    train, val = (load_split(dataset, s, cfg.bits, cache) for s in ("train", "val"))
    torch.manual_seed(seed)
    model = FactorizedAR(cfg).train()
    tcfg = train_config(ab, cfg)
    train_step = TrainStep(model, tcfg, DistInfo(0, 0, 1, torch.device("cpu")), lr_schedule(tcfg.schedule, 1))
    order = batches(train, ab.batch, seed)
    # the curve points read an evenly spread subset (the split is stored class by class)
    pick = torch.linspace(0, len(val[1]) - 1, min(ab.eval_images, len(val[1]))).round().long()
    curve_val = tuple(s[pick] for s in val[0]), val[1][pick]
    rows: List[Dict[str, Any]] = [{"step": 0, **heldout_nll(model, curve_val)}]
    t0, recent = time.time(), []
    for step in range(1, ab.steps + 1):
        recent.append(train_step(order)["loss"].item())
        if step % ab.log_every == 0 or step == ab.steps:
            rows.append({"step": step, "loss": sum(recent) / len(recent)})
            recent = []
        if step % ab.eval_every == 0 or step == ab.steps:
            rows.append({"step": step, **heldout_nll(model, curve_val)})
    minutes = (time.time() - t0) / 60
    final = heldout_nll(model, val)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model.eval().save(out / "model", extra={"seed": seed, "steps": ab.steps})
    tok = Tokenizer.from_checkpoint(tokenizer)
    grid = sample_grid(model, tok, ab.samples_per_class, seed, out / "samples.png")
    losses = [r["loss"] for r in rows if "loss" in r]
    return {
        "nll_nats": final["nll_nats"], "nll_bits": final["nll_bits"], "subtoken_nats": final["subtoken_nats"],
        "heldout_tokens": int(val[0][0].numel()), "train_images": int(len(train[1])),
        "final_train_loss": float(np.mean(losses[-5:])), "parameters": count_params(cfg),
        "train_minutes": minutes, "samples": str(grid),
        "curves": {"loss": [[r["step"], r["loss"]] for r in rows if "loss" in r],
                   "nll_nats": [[r["step"], r["nll_nats"]] for r in rows if "nll_nats" in r]},
    }
