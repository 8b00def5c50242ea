"""Training configuration of the Stage-2 AR model: model + optimiser + schedule + data + run settings.

    python -m stage2_ar.train --config ar-B data.path=s3://bucket/imagenet-tokens out_dir=runs/ar-B

Official recipe (reference section 4): AdamW (0.9, 0.95), peak LR 3e-4 (B, L) / 2.4e-4 (XL), weight decay
0.05 on every parameter (a quirk of the official weight-decay annealer, see ``OptimConfig.decay``), grad
clip 1.0, global batch 768, 300 epochs (B, L) / 350 (XL) with 6 / 7 warm-up epochs, bf16 on the NPUs.
The official node counts (4, 8, 12) pin ``num_canonical_nodes`` so the sample order does not change when
a run resumes on a different number of machines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

from shared.run_config import RunConfig
from stage2_ar.config import PRESETS as MODEL_PRESETS
from stage2_ar.config import ARConfig

DECAY_CHOICES = ("all", "2d", "linear")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4                      # peak
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    # Which parameters decay. "all": every parameter, which is what the official run ends up doing (its
    # annealer writes wd into every param group, the no-decay group of RMSNorm gains included);
    # "2d": every matrix (linear weights and embeddings), not the 1-D norm gains -- the grouping the
    # official code intended; "linear": only nn.Linear weights (no embeddings, no norms).
    decay: str = "all"
    grad_clip: float = 1.0                # max global grad norm; 0 disables clipping


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: float = 300.0                 # length of the run in passes over the training split...
    warmup_epochs: float = 6.0
    max_steps: int = 0                    # ...or in optimiser steps when > 0 (then warmup_steps counts too)
    warmup_steps: int = 0
    start_ratio: float = 0.005            # warm-up starts at 0.005 * peak
    hold_frac: float = 0.05               # constant for the first 5 % after warm-up
    end_ratio: float = 0.1                # linear decay to 0.1 * peak


@dataclass(frozen=True)
class DataConfig:
    path: str = ""                        # dataset directory (manifest.json + mds/) or remote URI (s3://, gs://)
    s3_endpoint_url: str = ""             # an S3-compatible store's endpoint ("": AWS_ENDPOINT_URL[_S3], else AWS);
                                          # credentials: the AWS environment or profile, never the config
    split: str = "train"
    val_split: str = ""                   # e.g. "val": report its loss every eval_every steps
    cache_dir: str = ""                   # local cache of the shards; "" -> <out_dir>/mds-cache
    global_batch: int = 768               # images per optimiser step, whatever the number of devices
    micro_batch: int = 24                 # images per device per forward; accumulation fills the rest
    num_workers: int = 4
    num_canonical_nodes: int = 4
    shuffle_seed: int = 0
    clean_stale_shm: bool = True          # remove shared memory left by crashed streaming runs at start-up
    retry_seconds: float = 120.0          # how long a shard read from object storage that fails transiently
                                          # (endpoint unreachable, timeouts, 5xx) is retried before the run stops


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Run settings (out_dir, seed, device, precision, resume, stop_after, ckpt_every, keep_last, log_every,
    tensorboard, threads) are ``shared.run_config.RunConfig``'s, with the same meaning in both stages."""
    model: ARConfig = field(default_factory=lambda: MODEL_PRESETS["ar-B"])
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/ar"
    precision: str = "bf16"               # fp32 | bf16 (fp16 is refused: the AR trainer has no loss scaling)
    parallel: str = "ddp"                 # ddp or fsdp (shards parameters, gradients and optimiser state)
    eval_every: int = 0
    eval_batches: int = 20
    sample_every: int = 0                 # PNG grid of class-conditional samples every N steps (0: off)
    sample_classes: Tuple[int, ...] = ()  # () -> the first 8 classes
    sample_per_class: int = 4
    sample_seed: int = 0
    tokenizer: str = ""                   # tokenizer REF (directory, official .ckpt, hf://...) to decode samples;
    #                                       "" -> a bit-colour token view
    allow_tokenizer_mismatch: bool = False  # decode with a tokenizer other than the dataset's (a deliberate swap)


def _preset(model: str, **kw) -> TrainConfig:
    return TrainConfig(model=MODEL_PRESETS[model], **kw)


PRESETS: Dict[str, TrainConfig] = {
    # global batch 768 = 24 x 8 x 4 (B), 12 x 8 x 8 (L), 8 x 8 x 12 (XL): per-device x devices x nodes
    "ar-B": _preset("ar-B", data=DataConfig(micro_batch=24, num_canonical_nodes=4)),
    "ar-L": _preset("ar-L", parallel="fsdp", data=DataConfig(micro_batch=12, num_canonical_nodes=8)),
    "ar-XL": _preset("ar-XL", parallel="fsdp", optim=OptimConfig(lr=2.4e-4),
                     schedule=ScheduleConfig(epochs=350.0, warmup_epochs=7.0),
                     data=DataConfig(micro_batch=8, num_canonical_nodes=12)),
    # CPU presets: fp32 (CPU bf16 autocast is slow and gains nothing here), small batches, frequent logs.
    "ar-tiny": _preset("ar-tiny", precision="fp32", device="cpu", optim=OptimConfig(lr=1e-3),
                       schedule=ScheduleConfig(max_steps=200, warmup_steps=10),
                       data=DataConfig(global_batch=16, micro_batch=8, num_workers=0, num_canonical_nodes=1),
                       log_every=1, ckpt_every=100, sample_every=0, tensorboard=False),
    "ar-demo": _preset("ar-demo", precision="fp32", device="cpu", optim=OptimConfig(lr=1e-3),
                       schedule=ScheduleConfig(max_steps=2000, warmup_steps=100),
                       data=DataConfig(global_batch=64, micro_batch=64, num_workers=2, num_canonical_nodes=1),
                       log_every=10, ckpt_every=500, sample_every=500),
}

