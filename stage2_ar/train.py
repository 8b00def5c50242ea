"""Train the factorized AR model on streamed token shards.

    python -m stage2_ar.train --config ar-B data.path=DATASET out_dir=runs/ar-B
    torchrun --nproc_per_node 8 -m stage2_ar.train --config ar-L data.path=s3://bucket/tokens ...

The trainer has the shape of Stage 1's (``shared/training_run.py``):

    trainer = Trainer(cfg, info)            # model, parallel wrapping, optimiser, loaders; no run file
    summary = trainer.fit()                 # resume, loop, checkpoints; trainer.preempted: 0 or 128 + signal
    stats = trainer.train_step(batches)     # one optimiser step, micro-batches drawn from an iterator

The step itself is ``TrainStep`` (model + optimiser + LR schedule, each with its state_dict): the loop here
and the ablations (``experiments/autoregressive.py``, micro-batches from memory) call the same one.
Parallelism (DDP / FSDP) and compilation are applied to the single-device model from outside
(``stage2_ar/parallelize.py``).

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

from shared.config import train_main
from stage2_ar.train_config import PRESETS, TrainConfig

CLI = dict(prog="python -m stage2_ar.train", doc=__doc__, config_cls=TrainConfig, presets=PRESETS, default="ar-B",
           errors=("stage2_ar.data:ShardError",))  # a data error: one line, status 1

if __name__ == "__main__":  # --help, --print-config and config errors answer before the heavy imports below
    raise SystemExit(train_main(None, **CLI, run="stage2_ar.train:_run"))

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from shared import checkpoint as ckpt
from shared import collectives
from shared import object_store
from shared import token_dataset as td
from shared.config import ConfigError
from shared.device import DistInfo, autocast, distributed_session
from shared.rng import seed_everything, set_rng_state
from shared.run_checkpoints import step_dir
from shared.runlog import get_logger, progress
from shared.training_run import PEAK_KEPT, RESCHEDULED, TrainingRun, run_length, steps_per_epoch, warn_long_warmup
from stage2_ar import data as sdata
from stage2_ar import parallelize
from stage2_ar.lr_schedule import WarmupHoldDecay, build_scheduler, load_scheduler_state
from stage2_ar.model import CHECKPOINT_KIND, FactorizedAR, subtoken_loss
from stage2_ar.train_config import DECAY_CHOICES, ScheduleConfig

log = get_logger("stage2_ar.train")  # lines carry the process's rank, looked up when logged

# the keys a resume may change, and what it then does (the schedule is rebuilt from the config every run)
SCHEDULE_KEYS = {**{f"schedule.{f.name}": RESCHEDULED for f in dataclasses.fields(ScheduleConfig)},
                 "data.global_batch": RESCHEDULED, "optim.lr": PEAK_KEPT}
PRECISIONS = ("fp32", "bf16")  # fp16 would need loss scaling; the official recipe is bf16
Batch = Tuple[Tuple[torch.Tensor, ...], torch.Tensor]  # one micro-batch on the device: (sub-tokens, labels)


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


def lr_schedule(s: ScheduleConfig, steps_per_epoch: int) -> WarmupHoldDecay:
    """The run's LR multiplier: ``max_steps`` and ``warmup_steps`` when given, else epochs of ``steps_per_epoch``."""
    total = run_length(s.max_steps, s.epochs, steps_per_epoch)
    warmup = s.warmup_steps if s.max_steps > 0 else round(s.warmup_epochs * steps_per_epoch)
    return WarmupHoldDecay(total, min(warmup, total), s.start_ratio, s.hold_frac, s.end_ratio)


class TrainStep:
    """One optimiser step of the AR model, and the state it changes: the optimiser and the LR scheduler.

    ``model`` is the plain model, ``wrapped`` what ``parallelize.wrap`` made of it (the model itself on one
    device). A call draws ``accumulation_steps(...)`` micro-batches from ``batches``, accumulates their
    gradients (synchronised on the last one only), clips them, and steps the optimiser and the schedule.
    """

    def __init__(self, model: FactorizedAR, cfg: TrainConfig, info: DistInfo, schedule: WarmupHoldDecay,
                 wrapped: Optional[nn.Module] = None):
        self.cfg, self.info = cfg, info
        self.model = model
        self.wrapped = model if wrapped is None else wrapped
        self.accum = accumulation_steps(cfg.data.global_batch, cfg.data.micro_batch, info.world_size)
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.wrapped, o.decay, o.weight_decay), lr=o.lr,
                                     betas=tuple(o.betas), eps=o.eps,
                                     fused=info.device.type == "cuda")  # one kernel for all parameters on CUDA
        self.schedule = schedule
        self.sched = build_scheduler(self.opt, schedule)

    def __call__(self, batches: Iterator[Batch]) -> Dict[str, Any]:
        """{"loss": this rank's mean micro-batch loss, "grad_norm": before clipping, "lr": the step's LR}; the
        loss and the norm stay on the device (no host sync)."""
        cfg, info, wrapped = self.cfg, self.info, self.wrapped
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(self.accum):
            subs, labels = next(batches)
            with parallelize.no_sync(wrapped, cfg.parallel, info, sync=micro == self.accum - 1):
                with autocast(info.device, cfg.precision):
                    loss = subtoken_loss(wrapped(subs, labels), subs)
                (loss / self.accum).backward()
            loss_sum += loss.detach().float()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss_sum / self.accum, "grad_norm": gnorm, "lr": lr}

    def state_dict(self) -> Dict[str, Any]:
        """Collective under FSDP: the full optimiser state (shards gathered) and the scheduler's."""
        return {"optimizer": parallelize.full_optimizer_state(self.wrapped, self.opt),
                "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        parallelize.load_optimizer_state(self.wrapped, self.opt, state["optimizer"])
        load_scheduler_state(self.sched, state["scheduler"])


# ---------------------------------------------------------------------------------------------- data

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
                              num_canonical_nodes=cfg.data.num_canonical_nodes, retry_seconds=cfg.data.retry_seconds,
                              pin_memory=torch.cuda.is_available(),
                              generator=torch.Generator().manual_seed(cfg.seed))


# ---------------------------------------------------------------------------------------------- samples

def bit_colour(indices: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """(B, h, w) tokens -> (B, 3, h*s, w*s) in [-1, 1]: bits 0-5 as 2-bit R, G, B (no tokenizer needed)."""
    rgb = torch.stack([(indices >> (2 * c)) & 3 for c in range(3)], 1).float() / 3 * 2 - 1
    return rgb.repeat_interleave(scale, -2).repeat_interleave(scale, -1)


@torch.no_grad()
def sample_images(model: FactorizedAR, cfg: TrainConfig, tokenizer=None) -> torch.Tensor:
    from stage2_ar.generate import generate_images

    classes = cfg.sample_classes or tuple(range(min(8, model.cfg.num_classes)))
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.sample_per_class)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.sample_seed)  # own stream: training RNG untouched
    out = generate_images(model, tokenizer, labels, generator=gen, return_tokens=tokenizer is None)
    return out.images if tokenizer is not None else bit_colour(out.tokens)


# ---------------------------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.run = TrainingRun(cfg, info, PRECISIONS, schedule_keys=SCHEDULE_KEYS)  # checks settings, out_dir
        if not cfg.data.path:
            raise ConfigError("data.path is required (a token dataset directory or a remote URI)")
        try:
            object_store.configure(cfg.data.s3_endpoint_url or None)  # also for the loader workers and Streaming
        except object_store.StoreError as e:
            raise ConfigError(f"data.s3_endpoint_url: {e}") from None
        if not cfg.data.retry_seconds >= 0:
            raise ConfigError(f"data.retry_seconds must be >= 0, got {cfg.data.retry_seconds}")
        cfg.model.validate()
        self.out = Path(cfg.out_dir)
        if cfg.data.clean_stale_shm:
            # this run's own cache: frees what a killed earlier run of this job left, never other jobs' segments
            sdata.clean_stale_shared_memory([cfg.data.cache_dir or str(self.out / "mds-cache")])
        manifest = td.read_manifest(cfg.data.path, str(self.out / "mds-cache"))
        sdata.check_manifest(manifest, cfg.model)
        layout = sdata.TokenLayout.from_manifest(manifest)
        self.tokens = td.tokens_record(manifest)  # kept in every checkpoint: stage2_ar.sample checks its tokenizer
        accumulation_steps(cfg.data.global_batch, cfg.data.micro_batch, info.world_size)  # refused before building

        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model = FactorizedAR(cfg.model).to(info.device)
        if cfg.compile:
            parallelize.compile_blocks(self.model)
        self.wrapped = parallelize.wrap(self.model, cfg.parallel, info)

        self.loader = make_loader(cfg, cfg.data.split, layout, cfg.data.micro_batch, shuffle=True)
        self.n_train = self.loader.dataset.size  # images: one sample per image, whatever the number of stored views
        self.spe = steps_per_epoch(self.n_train, cfg.data.global_batch)
        self.stepper = TrainStep(self.model, cfg, info, lr_schedule(cfg.schedule, self.spe), self.wrapped)
        self.total_steps = self.stepper.schedule.total_steps
        if info.is_main:
            sc = cfg.schedule
            warn_long_warmup(sc.warmup_steps if sc.max_steps > 0 else round(sc.warmup_epochs * self.spe), self.total_steps,
                             "it is cut to the run's length: the LR reaches its peak at the last step")
        self.val_loader = (make_loader(cfg, cfg.data.val_split, layout, cfg.data.micro_batch, shuffle=False)
                           if cfg.data.val_split and cfg.eval_every > 0 else None)
        self.step = 0
        self.preempted = 0  # after fit(): the exit status of a stop on SIGTERM/SIGINT (128 + signal), else 0
        self.logger = None  # opened by fit() once a resume has succeeded
        self._resume_rng: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Collective: full weights and optimiser state (FSDP shards gathered), every rank's RNG and data
        position; rank 0 writes. The checkpoint's config is the ARConfig: ``FactorizedAR.from_checkpoint`` and
        the sampler load it directly."""
        weights = parallelize.full_weights(self.wrapped)
        state = {**self.stepper.state_dict(), "micro_batch": self.cfg.data.micro_batch}
        return self.run.save(self.step, kind=CHECKPOINT_KIND, weights=lambda: weights, trainer_state=lambda: state,
                             model_config=self.cfg.model, loader=self.loader, extra={"tokens": self.tokens})

    def load(self, path: Path) -> None:
        """Weights, optimiser, scheduler, data position and step; this rank's RNG is restored by ``fit``."""
        _, weights = ckpt.read_checkpoint(path, kind=CHECKPOINT_KIND)
        ckpt.check_matches(self.model, weights, str(path))
        state, mine = self.run.load_state(path, self.cfg.data.micro_batch, global_data=True)
        parallelize.load_full_weights(self.wrapped, weights, self.info)
        self.stepper.load_state_dict(state)
        self.loader.load_state_dict(state["ranks"][0]["data"])  # the streaming position is global: same on all ranks
        self.step = int(state["step"])
        self._resume_rng = None if mine is None else mine["rng"]
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: Iterator[Batch]) -> Dict[str, Any]:
        """One optimiser step (``TrainStep``) over micro-batches drawn from ``batches``."""
        return self.stepper(batches)

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        cfg, info = self.cfg, self.info
        self.wrapped.eval()
        total, n = torch.zeros((), device=info.device), 0
        for i, batch in enumerate(self.val_loader):
            if i >= cfg.eval_batches:
                break
            subs, labels = sdata.batch_to_inputs(batch, info.device)
            with autocast(info.device, cfg.precision):
                total += subtoken_loss(self.wrapped(subs, labels), subs).float()
            n += 1
        self.wrapped.train()
        return collectives.mean_over_ranks({"val_loss": total / max(1, n)})

    def _sample_tokenizer(self):
        """The tokenizer that decodes the sample grids (rank 0), or None: grids then show the token bits."""
        cfg, info = self.cfg, self.info
        if not (cfg.tokenizer and cfg.sample_every > 0):
            return None
        try:
            # a model reference (shared.model_ref: directory, official .ckpt, hf://...); every rank checks it is
            # the dataset's tokenizer (all stop together); rank 0 alone decodes grids
            from stage1_tokenizer.convert_official import resolve_tokenizer
            from stage1_tokenizer.tokenizer import Tokenizer

            if not cfg.allow_tokenizer_mismatch:
                td.check_tokenizer(self.tokens, resolve_tokenizer(cfg.tokenizer).path,
                                   allow="allow_tokenizer_mismatch=true")
            if info.is_main:
                return Tokenizer.from_pretrained(cfg.tokenizer, device=info.device).eval()
        except (ImportError, OSError, ckpt.CheckpointError, KeyError, ValueError) as e:
            raise ConfigError(f"tokenizer={cfg.tokenizer} cannot be loaded for sample grids: {e}") from None
        return None

    def fit(self) -> Dict[str, Any]:
        """Run (or resume) training; returns a summary (final step, last logged stats, checkpoint path)."""
        with self.run as run:
            summary = self._train(run)
        self.preempted = run.exit_code
        return summary

    def _train(self, run: TrainingRun) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        self._resume_rng = None
        path = run.resume_path()
        if path is not None:
            self.load(path)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
        elif path is not None:  # another world size: the data order still resumes exactly, dropout re-seeded
            seed_everything(cfg.seed + 7919 * self.step + info.rank)
        else:
            seed_everything(cfg.seed + 1 + info.rank)  # independent dropout streams per rank
        tokenizer = self._sample_tokenizer()
        self.logger = run.begin(self.step)
        total = self.total_steps
        log.info("%d train images, %d steps/epoch, %d steps (warm-up %d), global batch %d = %d x %d x %d accum; "
                 "%.2fM params", self.n_train, self.spe, total, self.stepper.schedule.warmup_steps,
                 cfg.data.global_batch, cfg.data.micro_batch, info.world_size, self.stepper.accum,
                 sum(p.numel() for p in self.model.parameters()) / 1e6)

        stream = forever(self.loader)
        batches = (sdata.batch_to_inputs(batch, info.device) for batch in stream)
        bar = progress(None, rank=info.rank, initial=self.step, total=total, desc="train")
        last: Dict[str, Any] = {}
        t0, imgs = time.time(), 0
        self.wrapped.train()
        try:
            while self.step < total:
                stats = self.train_step(batches)
                self.step += 1
                imgs += cfg.data.global_batch
                bar.update(1)
                if run.log_due(self.step, total):
                    dt = max(time.time() - t0, 1e-9)
                    last = {"loss": collectives.mean_over_ranks({"loss": stats["loss"]})["loss"], "lr": stats["lr"],
                            "grad_norm": float(stats["grad_norm"]),
                            "epoch": self.step * cfg.data.global_batch / self.n_train, "images_per_s": imgs / dt}
                    self.logger.scalars(self.step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                    t0, imgs = time.time(), 0
                if self.val_loader is not None and self.step % cfg.eval_every == 0:
                    self.logger.scalars(self.step, self.validate())
                if cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                    if cfg.parallel == "fsdp" and info.distributed:
                        log.warning("sample grids are skipped under FSDP; sample from a checkpoint instead")
                    elif info.is_main:
                        self.logger.images(self.step, "samples", sample_images(self.model, cfg, tokenizer),
                                           nrow=cfg.sample_per_class)
                if run.end_of_step(self.step, total, self.save):
                    break
        finally:
            stream.close()  # drops the loader iterator, which shuts down its workers (they ignore SIGTERM)
        bar.close()
        return {"step": self.step, "total_steps": total, "last": last, "checkpoint": str(step_dir(self.out, self.step))}


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training on this process or under torchrun; returns the summary of ``Trainer.fit`` and
    ``preempted``: 0, or the exit status 128 + signal when SIGTERM/SIGINT stopped it with a checkpoint."""
    with distributed_session(cfg.device) as info:
        return _fit(cfg, info)


def _fit(cfg: TrainConfig, info: DistInfo) -> Dict[str, Any]:
    trainer = Trainer(cfg, info)  # gone when this returns, before the process group is torn down
    summary = trainer.fit()
    return {**summary, "preempted": trainer.preempted}


def _run(cfg: TrainConfig) -> int:
    summary = train(cfg)
    if not summary["preempted"]:
        log.info("done: step %d, %s", summary["step"], summary["last"])
    return summary["preempted"]


def main(argv=None) -> int:
    """0 when the run ended or stopped as asked; 128 + signal (143: SIGTERM) when it was preempted."""
    return train_main(argv, **CLI, run=_run)  # (``python -m`` runs the block at the top of this file)
