"""Training configuration of the Stage-1 tokenizer and its presets (reference §3 for the official numbers).

    python -m stage1_tokenizer.train --config tokenizer-16x-256 data.root=/data/imagenet/train
    torchrun --nproc_per_node 8 -m stage1_tokenizer.train --config tokenizer-8x-128 data.root=... \
        data.micro_batch=8 precision=bf16

The presets mirror the model presets of ``stage1_tokenizer.config`` and hold one of them as ``model``.
Batch sizes are *global*: ``data.global_batch`` images per optimizer step whatever the number of processes;
each process runs ``global_batch / (micro_batch * world_size)`` accumulation micro-steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

from shared.run_config import RunConfig
from stage1_tokenizer.config import PRESETS as MODEL_PRESETS
from stage1_tokenizer.config import TokenizerConfig

DISC_START_BOOKKEEPING = ("official", "skip")  # LossConfig.disc_start_bookkeeping


@dataclass(frozen=True)
class LossConfig:
    pixel_weight: float = 1.0          # L1
    perceptual_weight: float = 1.0     # LPIPS-VGG (frozen trunk and heads)
    lpips_weights: str = ""            # VGG16 trunk file; "" = $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth
    lpips_random_trunk: bool = False   # allow a random trunk when the file is missing (tests/offline demo only)
    gan_weight: float = 0.1            # official gen_loss_weight (fixed; the adaptive weight is unused)
    entropy_weight: float = 0.1        # x (per-sample entropy - codebook entropy)
    commitment_weight: float = 0.25
    disc_weight: float = 1.0           # official disc_factor
    lecam_weight: float = 0.05         # 0.05 for the 256 model, 0.01 for the 128 model
    lecam_decay: float = 0.999
    disc_start: int = 0                # optimizer step at which the GAN terms switch on (official 0)
    # Before disc_start: "official" runs the discriminator anyway (its BatchNorm statistics and the LeCAM EMAs
    # move) and takes Adam steps with zero gradients, and its loss switches on one step before the generator's
    # GAN term (the official D call sees global_step + 1); "skip" leaves the discriminator untouched until
    # disc_start and switches both sides on there. Identical when disc_start is 0 (the released recipes).
    disc_start_bookkeeping: str = "official"


@dataclass(frozen=True)
class DiscConfig:
    ndf: int = 64
    n_layers: int = 3


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4                   # generator Adam
    disc_lr: float = 1e-4              # discriminator Adam
    betas: Tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    lr_milestones: Tuple[int, ...] = (200, 250)  # epochs after which lr *= lr_gamma (256 model; 128: 250, 300)
    lr_gamma: float = 0.1
    warmup_steps: int = 0              # linear warm-up from 0 (official: none)
    grad_clip: float = 0.0             # 0 = no clipping (official)
    ema_decay: float = 0.999


@dataclass(frozen=True)
class DataConfig:
    root: str = ""                     # root/<class>/<img> or a plain folder of images
    val_root: str = ""                 # held-out images for in-training evaluation ("" = none)
    val_images: int = 64               # how many val images the in-training evaluation reads
    resolution: int = 256
    global_batch: int = 256            # official: 8 per device x 32 devices
    micro_batch: int = 8               # per process and micro-step
    num_workers: int = 8


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Run settings (out_dir, seed, device, precision, resume, stop_after, ckpt_every, keep_last, log_every,
    tensorboard, threads) are ``shared.run_config.RunConfig``'s, with the same meaning in both stages."""
    model: TokenizerConfig = field(default_factory=lambda: MODEL_PRESETS["tokenizer-16x-256"])
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/tokenizer"
    epochs: int = 270                  # training length when max_steps is 0
    max_steps: int = 0                 # > 0 overrides epochs
    ckpt_every: int = 5000
    log_every: int = 50
    image_every: int = 1000
    val_every: int = 0                 # 0 = no in-training evaluation


_BASE = TrainConfig()

PRESETS: Dict[str, TrainConfig] = {
    # Official 256x256 recipe: 270 epochs, lr x0.1 after epochs 200 and 250, LeCAM 0.05, bf16 as the paper's NPUs.
    "tokenizer-16x-256": replace(
        _BASE, model=MODEL_PRESETS["tokenizer-16x-256"], precision="bf16", epochs=270,
        loss=replace(_BASE.loss, lecam_weight=0.05),
        optim=replace(_BASE.optim, lr_milestones=(200, 250)),
        data=replace(_BASE.data, resolution=256),
    ),
    # Official 128x128 recipe: 350 epochs, lr x0.1 after epochs 250 and 300, LeCAM 0.01.
    "tokenizer-8x-128": replace(
        _BASE, model=MODEL_PRESETS["tokenizer-8x-128"], precision="bf16", epochs=350,
        loss=replace(_BASE.loss, lecam_weight=0.01),
        optim=replace(_BASE.optim, lr_milestones=(250, 300)),
        data=replace(_BASE.data, resolution=128),
    ),
    # Tests: a few steps of the whole machinery on 16x16 crops; random LPIPS trunk (no weights offline).
    "tokenizer-tiny": replace(
        _BASE, model=MODEL_PRESETS["tokenizer-tiny"], precision="fp32", max_steps=4, out_dir="runs/tokenizer-tiny",
        loss=replace(_BASE.loss, lpips_random_trunk=True),
        disc=DiscConfig(ndf=16, n_layers=2),  # 3 layers need >= 32 px inputs
        optim=replace(_BASE.optim, lr=1e-3, disc_lr=1e-3, lr_milestones=()),
        data=replace(_BASE.data, resolution=16, global_batch=4, micro_batch=2, num_workers=0, val_images=8),
        ckpt_every=2, keep_last=2, log_every=1, image_every=2, tensorboard=False,
    ),
    # CPU demo: 32x32 crops, 16 tokens per image, minutes on 2 cores. The perceptual term is off because
    # no VGG weights exist offline (a random-trunk LPIPS would only add noise); turn it on with real weights.
    "tokenizer-demo": replace(
        _BASE, model=MODEL_PRESETS["tokenizer-demo"], precision="fp32", max_steps=600, out_dir="runs/tokenizer-demo",
        loss=replace(_BASE.loss, perceptual_weight=0.0, lpips_random_trunk=True),
        optim=replace(_BASE.optim, lr=1e-3, disc_lr=1e-4, lr_milestones=(), ema_decay=0.99),  # short run: ~100-step EMA
        data=replace(_BASE.data, resolution=32, global_batch=16, micro_batch=16, num_workers=2, val_images=64),
        ckpt_every=200, keep_last=2, log_every=10, image_every=100, val_every=50,
    ),
}
