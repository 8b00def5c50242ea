"""Train the Stage-1 tokenizer: the official GAN recipe, under torchrun or alone, resumable step for step.

    python -m stage1_tokenizer.train --config tokenizer-demo data.root=photos/ out_dir=runs/demo
    torchrun --nproc_per_node 2 -m stage1_tokenizer.train --config tokenizer-tiny data.root=... out_dir=...

One optimizer step (manual optimisation, as the official LightningModule):
  1. G step: for each micro-batch, reconstruct, loss = L1 + LPIPS + 0.1 GAN + 0.1 entropy + 0.25 commit,
     backward (DDP syncs gradients on the last micro-batch only); Adam step; EMA update.
  2. D step: D(x) and D(x_hat.detach()) for every micro-batch, one LeCAM EMA update from their mean logits,
     hinge loss + LeCAM per micro-batch, one backward; Adam step.
The global batch is fixed by the config; the number of micro-steps adapts to the number of processes.

Outputs in ``out_dir``: config.yaml, metrics.jsonl (+ tb/), images/, step-NNNNNNNN/ checkpoints (the last K),
and both weight sets as plain "tokenizer" checkpoints, loadable by ``Tokenizer.from_checkpoint``: final/ (EMA:
reconstruction evaluation) and final-raw/ (raw: encoding tokens for AR training, as the official recipe);
see ``stage1_tokenizer.exports``.

SIGTERM / SIGINT (preemption, time limits, Ctrl-C): the optimizer step in progress finishes, a checkpoint of
that step is written exactly as a periodic one, and the process exits with status 128 + signal (143 for
SIGTERM); all ranks stop after the same step. Re-running the same command resumes exactly.

Checkpoints hold generator, EMA and discriminator weights in model.safetensors and everything else a
bit-exact continuation needs in trainer_state.pt: optimizers, schedulers, grad scalers, LeCAM EMAs, step,
the RNG states and data-loader position of every rank.
"""
from __future__ import annotations

from shared.config import train_main
from stage1_tokenizer.train_config import PRESETS, TrainConfig

CLI = dict(prog="python -m stage1_tokenizer.train", doc=__doc__, config_cls=TrainConfig, presets=PRESETS,
           default="tokenizer-demo")

if __name__ == "__main__":  # --help, --print-config and config errors answer before the heavy imports below
    raise SystemExit(train_main(None, **CLI, run="stage1_tokenizer.train:train"))

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shared import checkpoint as ckpt
from shared import collectives
from shared.config import ConfigError, to_dict
from shared.device import DistInfo, autocast, distributed_session
from shared.preemption import release_workers
from shared.rng import seed_everything, set_rng_state
from shared.runlog import get_logger, progress
from shared.training_run import PEAK_KEPT, RESCHEDULED, TrainingRun, run_length, steps_per_epoch, warn_long_warmup
from stage1_tokenizer.data import ImageFolderDataset, make_eval_loader, make_train_loader
from stage1_tokenizer.discriminator import PatchDiscriminator
from stage1_tokenizer.ema import EMA
from stage1_tokenizer.exports import EXPORT_DIRS
from stage1_tokenizer.losses import FrozenLPIPS, LeCAM, hinge_d_loss, non_saturating_g_loss
from stage1_tokenizer.metrics import batch_usage, psnr_per_image, to_uint8
from stage1_tokenizer.tokenizer import CHECKPOINT_KIND as TOKENIZER_KIND
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.train_config import DISC_START_BOOKKEEPING

TRAIN_CHECKPOINT_KIND = "tokenizer-train"  # generator + EMA + discriminator: not a loadable tokenizer
# the keys a resume may change, and what it then does (the LR lambda is rebuilt from the config every run)
SCHEDULE_KEYS = {**{k: RESCHEDULED for k in ("max_steps", "epochs", "data.global_batch", "optim.lr_milestones",
                                              "optim.lr_gamma", "optim.warmup_steps")},
                 "optim.lr": PEAK_KEPT, "optim.disc_lr": PEAK_KEPT}
log = get_logger("stage1.train")


class _GeneratorForward(nn.Module):
    """Tokenizer forward flattened to a tuple of tensors, so DDP sees plain outputs."""

    def __init__(self, tok: Tokenizer):
        super().__init__()
        self.tok = tok

    def forward(self, x: torch.Tensor):
        rec, q = self.tok(x)
        return rec, q.entropy_loss, q.per_sample_entropy, q.codebook_entropy, q.commitment, q.indices


def lr_factor(step: int, spe: int, milestones, gamma: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then x gamma after each milestone epoch (step decay)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    epoch = step // spe
    return warm * gamma ** sum(epoch >= m for m in milestones)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.world = info.world_size
        self.run = TrainingRun(cfg, info, schedule_keys=SCHEDULE_KEYS)  # checks the run settings before any model is built
        per_step = cfg.data.micro_batch * self.world
        if cfg.data.global_batch % per_step:
            raise ConfigError(f"data.global_batch {cfg.data.global_batch} is not a multiple of micro_batch "
                              f"{cfg.data.micro_batch} x {self.world} processes")
        self.accum = cfg.data.global_batch // per_step
        if cfg.loss.disc_start_bookkeeping not in DISC_START_BOOKKEEPING:
            raise ConfigError(f"loss.disc_start_bookkeeping must be one of {', '.join(DISC_START_BOOKKEEPING)}, "
                              f"got {cfg.loss.disc_start_bookkeeping!r}")
        if not cfg.data.root:
            raise ConfigError("data.root is required (a folder of images or root/<class>/<image>)")
        if cfg.data.resolution % cfg.model.downsample_factor:
            raise ConfigError(f"data.resolution {cfg.data.resolution} is not a multiple of the model's "
                              f"downsampling factor {cfg.model.downsample_factor}")
        self.out = Path(cfg.out_dir)

        seed_everything(cfg.seed)  # same initial weights on every rank
        self.tok = Tokenizer(cfg.model).to(self.device).train()
        if cfg.compile:  # in place: state_dict keys unchanged, so checkpoints are the same either way
            self.tok.encoder.compile()
            self.tok.decoder.compile()
        self.disc = PatchDiscriminator(3, cfg.disc.ndf, cfg.disc.n_layers).to(self.device).train()
        self.ema = EMA(self.tok, cfg.optim.ema_decay)
        self.lecam = LeCAM(cfg.loss.lecam_decay).to(self.device)
        self.lpips = None
        if cfg.loss.perceptual_weight > 0:
            self.lpips = FrozenLPIPS("vgg", cfg.loss.lpips_weights or None, cfg.loss.lpips_random_trunk).to(self.device)

        o = cfg.optim
        self.opt_g = torch.optim.Adam(self.tok.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=o.disc_lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

        self.dataset = ImageFolderDataset(Path(cfg.data.root), cfg.data.resolution, train=True, seed=cfg.seed)
        self.spe = steps_per_epoch(len(self.dataset), cfg.data.global_batch)  # official: ceil, 5005 on ImageNet
        self.total_steps = run_length(cfg.max_steps, cfg.epochs, self.spe)
        if info.is_main:
            warn_long_warmup(o.warmup_steps, self.total_steps, "the LR never reaches its peak")
        sched = lambda step: lr_factor(step, self.spe, o.lr_milestones, o.lr_gamma, o.warmup_steps)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, sched)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, sched)
        fp16 = cfg.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)

        self.loader = make_train_loader(self.dataset, cfg.data.micro_batch, cfg.data.num_workers, cfg.seed,
                                        info.rank, self.world, pin_memory=self.device.type == "cuda")
        self.val_loader = None
        if cfg.val_every > 0 and cfg.data.val_root:
            val = ImageFolderDataset(Path(cfg.data.val_root), cfg.data.resolution, train=False)
            # each rank evaluates its share; evaluate_tokenizer sums and gathers over ranks
            self.val_loader = make_eval_loader(val, batch_size=32, limit=cfg.data.val_images, rank=info.rank,
                                               world_size=self.world)

        self.g_fwd: nn.Module = _GeneratorForward(self.tok)
        self.d_fwd: nn.Module = self.disc
        if self.world > 1:
            ids = [self.device.index] if self.device.type != "cpu" else None
            self.g_fwd = DDP(self.g_fwd, device_ids=ids)
            self.d_fwd = DDP(self.disc, device_ids=ids)
        self.step = 0
        self.preempted = 0  # after fit(): the exit status of a stop on SIGTERM/SIGINT (128 + signal), else 0
        self.logger = None  # opened by fit() once a resume has succeeded

    # ------------------------------------------------------------------ checkpoints
    def _weights(self) -> Dict[str, torch.Tensor]:
        sd = {f"generator.{k}": v for k, v in self.tok.state_dict().items()}
        sd.update({f"ema.{k}": v for k, v in self.ema.weights().items()})
        sd.update({f"discriminator.{k}": v for k, v in self.disc.state_dict().items()})
        return sd

    def _trainer_state(self) -> Dict[str, Any]:
        return {
            "micro_batch": self.cfg.data.micro_batch,
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict(),
            "lecam": {"ema_real": float(self.lecam.ema_real), "ema_fake": float(self.lecam.ema_fake)},
        }

    def save(self) -> Path:
        """Collective: every rank contributes its RNG and data position; rank 0 writes the checkpoint."""
        return self.run.save(self.step, kind=TRAIN_CHECKPOINT_KIND, weights=self._weights,
                             trainer_state=self._trainer_state, model_config=self.cfg.model, loader=self.loader)

    def load(self, path: Path) -> None:
        meta = ckpt.load_meta(path)
        if meta["kind"] != TRAIN_CHECKPOINT_KIND:
            raise ckpt.CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, not a training checkpoint")
        sd = ckpt.load_state_dict(path)
        part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        ckpt.load_strict(self.tok, part("generator."), f"{path} (generator)")
        ckpt.load_strict(self.ema.model, part("ema."), f"{path} (ema)")
        ckpt.load_strict(self.disc, part("discriminator."), f"{path} (discriminator)")
        # per-rank sampler shards: only the same world size and micro-batch resume (exactly)
        st, mine = self.run.load_state(path, self.cfg.data.micro_batch, global_data=False)
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.sched_g.load_state_dict(st["sched_g"])
        self.sched_d.load_state_dict(st["sched_d"])
        self.scaler_g.load_state_dict(st["scaler_g"])
        self.scaler_d.load_state_dict(st["scaler_d"])
        self.lecam.ema_real.fill_(st["lecam"]["ema_real"])
        self.lecam.ema_fake.fill_(st["lecam"]["ema_fake"])
        self.loader.load_state_dict(mine["data"])
        self._resume_rng = mine["rng"]
        self.step = int(st["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ one step
    def _micro_batches(self, it) -> List[torch.Tensor]:
        return [next(it)["image"].to(self.device, non_blocking=True) for _ in range(self.accum)]

    def _sync(self, module: nn.Module, last: bool):
        return module.no_sync() if isinstance(module, DDP) and not last else nullcontext()

    def _grad_norm(self, params, clip: float) -> torch.Tensor:
        params = [p for p in params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")).detach()

    def _gan_switches(self) -> Tuple[float, float, bool]:
        """(weight of the generator's GAN term, weight of the D loss, whether D runs at all) at this step.

        ``official`` bookkeeping (default): the official loss module gets ``global_step`` in the G call and
        ``global_step + 1`` in the D call (under manual optimisation Lightning's counter advances with the
        generator's optimizer), so D's loss switches on one step before the generator's GAN term; before
        that, D still runs (BatchNorm statistics, LeCAM EMAs) and its loss is multiplied by 0, so its Adam
        takes steps with zero gradients (the moments decay and the step count grows). ``skip``: nothing of D
        runs before ``disc_start`` and both sides switch on there. The two agree when disc_start is 0.
        """
        L = self.cfg.loss
        official = L.disc_start_bookkeeping == "official"
        g_on = self.step >= L.disc_start
        d_on = (self.step + 1 if official else self.step) >= L.disc_start
        return (L.gan_weight if g_on else 0.0), (L.disc_weight if d_on else 0.0), official or g_on

    def train_step(self, xs: List[torch.Tensor], log: bool = True) -> Dict[str, Any]:
        """One G + D optimizer step. The statistics stay on the device; the ones that need the host (PSNR of
        uint8 images, codebook usage) are computed on logging steps only (``log``)."""
        cfg, L = self.cfg, self.cfg.loss
        gan_w, disc_w, run_disc = self._gan_switches()
        stats: Dict[str, Any] = {}

        def add(name: str, value: torch.Tensor) -> None:
            stats[name] = stats.get(name, 0.0) + value.detach().float() / self.accum

        # ---- generator
        self.disc.requires_grad_(False)
        recs, usages, psnrs = [], [], []
        for i, x in enumerate(xs):
            with self._sync(self.g_fwd, i == len(xs) - 1):
                with autocast(self.device, cfg.precision):
                    rec, ent, h_s, h_c, commit, idx = self.g_fwd(x)
                    rec = rec.float()
                    l1 = (x - rec).abs().mean()
                    lp = self.lpips(x, rec).mean() if self.lpips is not None else rec.new_zeros(())
                    g_gan = non_saturating_g_loss(self.disc(rec)) if run_disc else rec.new_zeros(())
                loss = (L.pixel_weight * l1 + L.perceptual_weight * lp + gan_w * g_gan
                        + L.entropy_weight * ent + L.commitment_weight * commit)
                self.scaler_g.scale(loss / self.accum).backward()
            recs.append(rec.detach())
            add("g/loss", loss); add("g/l1", l1); add("g/lpips", lp); add("g/gan", g_gan)
            add("g/entropy", ent); add("g/sample_entropy", h_s); add("g/codebook_entropy", h_c); add("g/commit", commit)
            if log:
                usages.append(batch_usage(idx, self.tok.bits))
                psnrs.append(psnr_per_image(to_uint8(x), to_uint8(rec)).mean())
        self.scaler_g.unscale_(self.opt_g)
        stats["g/grad_norm"] = self._grad_norm(self.tok.parameters(), cfg.optim.grad_clip)
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.opt_g.zero_grad(set_to_none=True)
        self.ema.update(self.tok)
        self.disc.requires_grad_(True)

        # ---- discriminator
        if run_disc:
            with autocast(self.device, cfg.precision):
                logits = [(self.d_fwd(x).float(), self.d_fwd(rec).float()) for x, rec in zip(xs, recs)]
            # One LeCAM update per optimizer step, before any term uses it (the official order), from the mean
            # logits of the whole global batch: the micro-batches' means (equal sizes), averaged over ranks, so
            # every rank holds the same EMAs. Hence all micro-batches are through D before the one backward.
            means = torch.stack([torch.stack([r.detach().mean(), f.detach().mean()]) for r, f in logits]).mean(0)
            means = collectives.all_reduce_(means, "mean")
            self.lecam.update(means[0], means[1])
            d_total = 0.0
            for real, fake in logits:
                hinge = hinge_d_loss(real, fake)
                reg = self.lecam(real, fake)
                d_loss = disc_w * (hinge + L.lecam_weight * reg)
                d_total = d_total + d_loss / self.accum
                add("d/loss", d_loss); add("d/hinge", hinge); add("d/lecam", reg)
                add("d/logits_real", real.mean()); add("d/logits_fake", fake.mean())
            self.scaler_d.scale(d_total).backward()
            self.scaler_d.unscale_(self.opt_d)
            stats["d/grad_norm"] = self._grad_norm(self.disc.parameters(), cfg.optim.grad_clip)
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
            self.opt_d.zero_grad(set_to_none=True)
        stats["lr/g"] = self.opt_g.param_groups[0]["lr"]
        stats["lr/d"] = self.opt_d.param_groups[0]["lr"]
        self.sched_g.step()
        self.sched_d.step()
        if log:
            stats["codebook/batch_usage"] = sum(usages) / len(usages)
            stats["train/psnr"] = sum(psnrs) / len(psnrs)
        self._last = (xs[0], recs[0])
        return stats

    # ------------------------------------------------------------------ loop
    def validate(self) -> Dict[str, float]:
        from stage1_tokenizer.evaluate import evaluate_tokenizer

        res = evaluate_tokenizer(self.ema.model, self.val_loader, self.device, info=self.info)
        return {f"val/{k}": v for k, v in res.items() if isinstance(v, (int, float))}

    def fit(self) -> Dict[str, Any]:
        with self.run as run:
            try:
                stats = self._fit(run)
            finally:
                release_workers(self.loader)  # its workers ignore SIGTERM: stop them here, not at exit
        self.preempted = run.exit_code
        return stats

    def _fit(self, run: TrainingRun) -> Dict[str, Any]:
        cfg = self.cfg
        if self.info.is_main:  # OUT/final* are replaced at the end: refuse someone else's directory now, not then
            for name in EXPORT_DIRS.values():
                ckpt.check_checkpoint_output(self.out / name, TOKENIZER_KIND)
        self._resume_rng = None
        path = run.resume_path()
        if path is not None:
            self.load(path)
        self.logger = run.begin(self.step)
        log.info("%d images, %d steps/epoch, %d steps total, global batch %d = %d x %d micro x %d ranks, %s",
                 len(self.dataset), self.spe, self.total_steps, cfg.data.global_batch, cfg.data.micro_batch,
                 self.accum, self.world, cfg.precision)
        it = iter(self.loader)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
        start, t0 = self.step, time.time()
        bar = progress(None, self.info.rank, initial=start, total=self.total_steps, desc="tokenizer")
        stats: Dict[str, Any] = {}
        if self.val_loader is not None and self.step == 0:
            self.logger.scalars(0, self.validate())  # the starting point of the curve
        while self.step < self.total_steps:
            stats = self.train_step(self._micro_batches(it), log=run.log_due(self.step + 1, self.total_steps))
            self.step += 1
            bar.update(1)
            last = self.step == self.total_steps
            if run.log_due(self.step, self.total_steps):
                stats = collectives.mean_over_ranks(stats)  # the one host sync of a logging step
                stats["time/step_s"] = (time.time() - t0) / (self.step - start)
                self.logger.scalars(self.step, stats)
                bar.set_postfix(loss=f"{stats['g/loss']:.3f}", psnr=f"{stats['train/psnr']:.2f}")
            if self.val_loader is not None and (self.step % cfg.val_every == 0 or last):
                self.logger.scalars(self.step, self.validate())
            if cfg.image_every > 0 and (self.step % cfg.image_every == 0 or last):
                x, rec = self._last
                n = min(8, x.shape[0])
                self.logger.images(self.step, "input-vs-recon", torch.cat([x[:n], rec[:n].clamp(-1, 1)]), nrow=n)
            if run.end_of_step(self.step, self.total_steps, self.save):
                break
        bar.close()
        if self.step == self.total_steps and self.info.is_main:
            for weights, name in EXPORT_DIRS.items():
                self.export(self.out / name, weights)
        return stats

    def export(self, path: Path, weights: str = "ema") -> Path:
        """One weight set as a plain tokenizer checkpoint that names it (``extra["weights"]``): "ema" (what
        evaluation and the demo load) or "raw" (the generator's weights: what the AR recipe encodes with)."""
        model = {"ema": self.ema.model, "raw": self.tok}[weights]
        model.save(path, extra={"step": self.step, "weights": weights, "source": weights,
                                "train_config": to_dict(self.cfg)})
        log.info("exported the %s tokenizer weights to %s", weights, path)
        return path


def train(cfg: TrainConfig) -> int:
    """Train (or resume) on this process or under torchrun; returns 0, or 128 + signal after a preemption."""
    with distributed_session(cfg.device) as info:
        return _fit(cfg, info)


def _fit(cfg: TrainConfig, info: DistInfo) -> int:
    trainer = Trainer(cfg, info)  # gone when this returns, before the process group is torn down
    trainer.fit()
    return trainer.preempted


def main(argv: Optional[List[str]] = None) -> int:
    """0 when the run ended or stopped as asked; 128 + signal (143: SIGTERM) when it was preempted."""
    return train_main(argv, **CLI, run=train)  # (``python -m`` runs the block at the top of this file)
