"""Train the factorized AR model on streamed token shards.

    python -m stage2_ar.train --config ar-B data.path=DATASET out_dir=runs/ar-B
    torchrun --nproc_per_node 8 -m stage2_ar.train --config ar-L data.path=s3://bucket/tokens ...

One optimiser step sees ``data.global_batch`` images whatever the number of devices: each device runs
``global_batch / (micro_batch * world_size)`` micro-batches and the gradients are accumulated (synchronised
only on the last one). Checkpoints (``out_dir/step-NNNNNNNN``) hold the weights, optimiser, scheduler, step,
every rank's RNG and the data-loader position, so an interrupted run resumed with ``resume=auto`` continues
exactly as if it had never stopped (tested on CPU).

SIGTERM / SIGINT (preemption, time limits, Ctrl-C): the optimiser step in progress finishes, a checkpoint of
that step is written exactly as a periodic one, and the process exits with status 128 + signal (143 for
SIGTERM); all ranks stop after the same step.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from shared import checkpoint as ckpt
from shared import collectives
from shared import object_store
from shared import token_dataset as td
from shared.config import ConfigError, to_dict
from shared.device import DistInfo, autocast, cleanup_distributed, init_distributed
from shared.rng import rng_state, seed_everything, set_rng_state
from shared.run_checkpoints import save_training_checkpoint, step_dir
from shared.run_config import check_run_config
from shared.runlog import get_logger, progress
from shared.training_run import TrainingRun, train_main
from stage2_ar import data as sdata
from stage2_ar.lr_schedule import WarmupHoldDecay, build_scheduler, load_scheduler_state
from stage2_ar.model import KIND, FactorizedAR, subtoken_loss
from stage2_ar.train_config import DECAY_CHOICES, PRESETS, TrainConfig

log = logging.getLogger("stage2_ar.train")  # configured per rank by train()


# ---------------------------------------------------------------------------------------------- optimiser

def param_groups(model: nn.Module, mode: str, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: which parameters decay (see OptimConfig.decay)."""
    if mode not in DECAY_CHOICES:
        raise ConfigError(f"optim.decay must be one of {', '.join(DECAY_CHOICES)}, got {mode!r}")
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if mode == "all":
            yes = True
        elif mode == "2d":
            yes = p.ndim >= 2
        else:
            yes = id(p) in linear_weights
        (decay if yes else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if micro_batch < 1 or global_batch < 1 or global_batch % per_step:
        raise ConfigError(f"data.global_batch {global_batch} is not a multiple of data.micro_batch {micro_batch} "
                          f"x {world_size} device(s)")
    return global_batch // per_step


# ---------------------------------------------------------------------------------------------- model wrapping

def compile_blocks(model: FactorizedAR, **compile_kwargs) -> FactorizedAR:
    """``torch.compile`` every inter/intra block in place (before DDP/FSDP wrap them): the blocks are the
    FLOPs, state_dict keys stay the official ones, and per-block graphs compose with FSDP's per-block shards."""
    for block in list(model.inter) + list(model.intra):
        block.compile(**compile_kwargs)
    return model


def wrap(model: FactorizedAR, cfg: TrainConfig, info: DistInfo) -> nn.Module:
    """DDP, or FSDP (per-block sharding) for the large presets; the plain model on one device."""
    if not info.distributed:
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type in ("cuda", "npu") else None
        return DDP(model, device_ids=ids)
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in list(model.inter) + list(model.intra):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"parallel must be ddp or fsdp, got {cfg.parallel!r}")


def _no_sync(wrapped: nn.Module, cfg: TrainConfig, info: DistInfo, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not info.distributed or sync:
        if info.distributed and cfg.parallel == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if cfg.parallel == "fsdp":
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return wrapped.no_sync()


def _sd_options(saving: bool = True):
    """Full (unsharded) state dicts; when saving, gathered to CPU on rank 0 only (the writer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=saving)


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, step: int, model: FactorizedAR, wrapped: nn.Module, opt, sched, loader,
                    cfg: TrainConfig, info: DistInfo, tokens: Dict[str, Any] | None = None) -> Path:
    """Collective: gather full weights / optimiser state (FSDP shards included) and every rank's RNG.
    ``tokens``: the dataset's ``shared.token_dataset.tokens_record`` (which tokenizer decodes the samples)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(wrapped, options=_sd_options())
    osd = get_optimizer_state_dict(wrapped, opt, options=_sd_options())
    return save_training_checkpoint(
        out, step, kind=KIND, weights=lambda: msd, config=to_dict(cfg.model),
        trainer_state=lambda: {"optimizer": osd, "scheduler": sched.state_dict()},
        per_rank={"rng": rng_state(), "data": loader.state_dict()}, keep_last=cfg.keep_last,
        is_main=info.is_main, extra={"train_config": to_dict(cfg), "tokens": tokens})


# ---------------------------------------------------------------------------------------------- data

def steps_in_epoch(images: int, global_batch: int) -> int:
    """Optimiser steps the schedule counts per epoch: ceil(images / global batch), the official count.

    The official trainer (Lightning, DistributedSampler without drop_last) ends every epoch with a short
    batch, so an epoch there is ceil(ceil(N / ranks) / per-device batch) steps; for ImageNet's 1,281,167
    images and the presets' 768 = 24 x 32 (B), 12 x 64 (L), 8 x 96 (XL) that is 1669, which is also
    ceil(N / 768). Our loader keeps every step at the full global batch (exact resumption), so the
    schedule's steps run across epoch boundaries instead: the same steps, 0.05 % more images seen.
    """
    return max(1, -(-int(images) // int(global_batch)))


def forever(loader) -> Iterator[Tuple[Any, int]]:
    """Micro-batches across epochs (a resumed epoch may be already finished: then the next one starts)."""
    empty = 0
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        empty = empty + 1 if n == 0 else 0
        if empty >= 2:
            raise RuntimeError("the training split yields no full micro-batch; lower data.micro_batch")


def make_loader(cfg: TrainConfig, split: str, layout: sdata.TokenLayout, micro: int, shuffle: bool):
    cache = cfg.data.cache_dir or str(Path(cfg.out_dir) / "mds-cache")
    return sdata.build_loader(cfg.data.path, split=split, batch_size=micro, layout=layout,
                              num_workers=cfg.data.num_workers, cache_dir=cache,
                              shuffle=shuffle, shuffle_seed=cfg.data.shuffle_seed,
                              view_seed=cfg.data.shuffle_seed if shuffle else None,  # evaluation: view 0
                              num_canonical_nodes=cfg.data.num_canonical_nodes,
                              pin_memory=torch.cuda.is_available(),
                              generator=torch.Generator().manual_seed(cfg.seed))


# ---------------------------------------------------------------------------------------------- samples

def bit_colour(indices: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """(B, h, w) tokens -> (B, 3, h*s, w*s) in [-1, 1]: bits 0-5 as 2-bit R, G, B (no tokenizer needed)."""
    rgb = torch.stack([(indices >> (2 * c)) & 3 for c in range(3)], 1).float() / 3 * 2 - 1
    return rgb.repeat_interleave(scale, -2).repeat_interleave(scale, -1)


@torch.no_grad()
def sample_images(model: FactorizedAR, cfg: TrainConfig, tokenizer=None) -> torch.Tensor:
    from stage2_ar.sample import generate

    classes = cfg.sample_classes or tuple(range(min(8, model.cfg.num_classes)))
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.sample_per_class)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.sample_seed)  # own stream: training RNG untouched
    indices = generate(model, labels, generator=gen)
    return tokenizer.decode(indices).clamp(-1, 1).cpu() if tokenizer is not None else bit_colour(indices.cpu())


# ---------------------------------------------------------------------------------------------- loop

@torch.no_grad()
def evaluate_loss(wrapped: nn.Module, loader, cfg: TrainConfig, info: DistInfo) -> float:
    wrapped.eval()
    total, n = torch.zeros((), device=info.device), 0
    for i, batch in enumerate(loader):
        if i >= cfg.eval_batches:
            break
        subs, labels = sdata.batch_to_inputs(batch, info.device)
        with autocast(info.device, cfg.precision):
            total += subtoken_loss(wrapped(subs, labels), subs).float()
        n += 1
    wrapped.train()
    return collectives.mean_over_ranks({"val_loss": total / max(1, n)})["val_loss"]


PRECISIONS = ("fp32", "bf16")  # fp16 would need loss scaling; the official recipe is bf16


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training; returns a summary (final step, last logged loss, checkpoint path, and
    ``preempted``: 0, or the exit status 128 + signal when SIGTERM/SIGINT stopped it with a checkpoint)."""
    check_run_config(cfg, PRECISIONS)
    if not cfg.data.path:
        raise ConfigError("data.path is required (a token dataset directory or a remote URI)")
    try:
        object_store.configure(cfg.data.s3_endpoint_url or None)  # also for the loader workers and Streaming
    except object_store.StoreError as e:
        raise ConfigError(f"data.s3_endpoint_url: {e}") from None
    cfg.model.validate()
    info = init_distributed(cfg.device)
    get_logger("stage2_ar.train", info.rank)
    try:
        with TrainingRun(cfg, info, PRECISIONS) as run:
            summary = _train(cfg, info, run)
        return {**summary, "preempted": run.exit_code}
    finally:
        cleanup_distributed()


def _train(cfg: TrainConfig, info: DistInfo, run: TrainingRun) -> Dict[str, Any]:
    out = Path(cfg.out_dir)
    if cfg.data.clean_stale_shm:
        # this run's own cache: frees what a killed earlier run of this job left, never other jobs' segments
        sdata.clean_stale_shared_memory([cfg.data.cache_dir or str(out / "mds-cache")])
    manifest = sdata.read_manifest(cfg.data.path, str(out / "mds-cache"))
    sdata.check_manifest(manifest, cfg.model)
    layout = sdata.TokenLayout.from_manifest(manifest)
    accum = accumulation_steps(cfg.data.global_batch, cfg.data.micro_batch, info.world_size)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = FactorizedAR(cfg.model)
    resume_dir = run.resume_path()
    state = None
    if resume_dir is not None:
        ckpt.load_weights(model, resume_dir, kind=KIND)
        state = ckpt.load_trainer_state(resume_dir)
    model.to(info.device)
    if cfg.compile:
        compile_blocks(model)
    wrapped = wrap(model, cfg, info)
    opt = torch.optim.AdamW(param_groups(wrapped, cfg.optim.decay, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            fused=info.device.type == "cuda")  # one kernel for all parameters on CUDA

    loader = make_loader(cfg, cfg.data.split, layout, cfg.data.micro_batch, shuffle=True)
    n_train = loader.dataset.size  # images: one sample per image, whatever the number of stored views
    steps_per_epoch = steps_in_epoch(n_train, cfg.data.global_batch)
    if cfg.schedule.max_steps > 0:
        total, warmup = cfg.schedule.max_steps, cfg.schedule.warmup_steps
    else:
        total = max(1, round(cfg.schedule.epochs * steps_per_epoch))
        warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    s = cfg.schedule
    sched = build_scheduler(opt, WarmupHoldDecay(total, min(warmup, total), s.start_ratio, s.hold_frac, s.end_ratio))

    step = 0
    if state is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, opt, optim_state_dict=state["optimizer"],
                                 options=_sd_options(saving=False))
        load_scheduler_state(sched, state["scheduler"])
        ranks = state["ranks"]
        loader.load_state_dict(ranks[0]["data"])  # the streaming position is global: the same on every rank
        step = int(state["step"])
        if state["world_size"] == info.world_size:
            set_rng_state(ranks[info.rank]["rng"])
        else:  # the data order still resumes exactly; dropout streams restart from a derived seed
            log.warning("resuming on %d device(s) from a %s-device run: dropout RNG re-seeded",
                        info.world_size, state["world_size"])
            seed_everything(cfg.seed + 7919 * step + info.rank)
        log.info("resumed from %s at step %d", resume_dir, step)
    else:
        seed_everything(cfg.seed + 1 + info.rank)  # independent dropout streams per rank
    val_loader = (make_loader(cfg, cfg.data.val_split, layout, cfg.data.micro_batch, shuffle=False)
                  if cfg.data.val_split and cfg.eval_every > 0 else None)
    tokens = td.tokens_record(manifest)  # kept in every checkpoint: stage2_ar.sample checks its tokenizer with it
    tokenizer = None
    if cfg.tokenizer and cfg.sample_every > 0:
        try:
            # every rank checks it is the dataset's tokenizer (all stop together); rank 0 alone decodes grids
            if not cfg.allow_tokenizer_mismatch:
                td.check_tokenizer(tokens, cfg.tokenizer)
            if info.is_main:
                from stage1_tokenizer.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_checkpoint(cfg.tokenizer, device=info.device).eval()
        except (ImportError, OSError, ckpt.CheckpointError, KeyError, ValueError) as e:
            raise ConfigError(f"tokenizer={cfg.tokenizer} cannot be loaded for sample grids: {e}") from None

    logger = run.begin(step)
    log.info("%d train images, %d steps/epoch, %d steps (warm-up %d), global batch %d = %d x %d x %d accum; "
             "%.2fM params", n_train, steps_per_epoch, total, warmup, cfg.data.global_batch,
             cfg.data.micro_batch, info.world_size, accum, sum(p.numel() for p in model.parameters()) / 1e6)

    def save() -> Path:
        return save_checkpoint(out, step, model, wrapped, opt, sched, loader, cfg, info, tokens)

    batches = forever(loader)
    bar = progress(None, rank=info.rank, initial=step, total=total, desc="train")
    last = {}
    t0, imgs = time.time(), 0
    wrapped.train()
    while step < total:
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(accum):
            subs, labels = sdata.batch_to_inputs(next(batches), info.device)
            with _no_sync(wrapped, cfg, info, sync=micro == accum - 1):
                with autocast(info.device, cfg.precision):
                    loss = subtoken_loss(wrapped(subs, labels), subs)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        imgs += cfg.data.global_batch
        bar.update(1)

        if run.log_due(step, total):
            dt = max(time.time() - t0, 1e-9)
            last = {"loss": collectives.mean_over_ranks({"loss": loss_sum / accum})["loss"], "lr": lr,
                    "grad_norm": float(gnorm), "epoch": step * cfg.data.global_batch / n_train,
                    "images_per_s": imgs / dt}
            logger.scalars(step, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            t0, imgs = time.time(), 0
        if val_loader is not None and step % cfg.eval_every == 0:
            logger.scalars(step, {"val_loss": evaluate_loss(wrapped, val_loader, cfg, info)})
        if cfg.sample_every > 0 and step % cfg.sample_every == 0:
            if cfg.parallel == "fsdp" and info.distributed:
                log.warning("sample grids are skipped under FSDP; sample from a checkpoint instead")
            elif info.is_main:
                logger.images(step, "samples", sample_images(model, cfg, tokenizer), nrow=cfg.sample_per_class)
        if run.end_of_step(step, total, save):
            break
    bar.close()
    batches.close()  # drops the loader iterator, which shuts down its workers (they ignore SIGTERM)
    return {"step": step, "total_steps": total, "last": last, "checkpoint": str(step_dir(out, step))}


def _run(cfg: TrainConfig) -> int:
    summary = train(cfg)
    if not summary["preempted"]:
        log.info("done: step %d, %s", summary["step"], summary["last"])
    return summary["preempted"]


def main(argv=None) -> int:
    """0 when the run ended or stopped as asked; 128 + signal (143: SIGTERM) when it was preempted."""
    return train_main(argv, prog="python -m stage2_ar.train", doc=__doc__, config_cls=TrainConfig, presets=PRESETS,
                      default="ar-B", run=_run, errors=(sdata.ManifestError,))


if __name__ == "__main__":
    raise SystemExit(main())
