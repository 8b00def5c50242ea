"""The ablations as named presets: frozen dataclasses, like every other config of the project.

The budget of a run is its number of optimiser steps (equal within a comparison), on one torch thread;
``docs/ablations.md`` states the minutes each took on the shared 2-core machine. Two suites:

    full    what ``python -m experiments.run --all`` runs (about 40 minutes on one core, two seeds)
    smoke   the same code on tiny sizes (2 steps each, one seed): what the test suite runs

Tokenizer runs (claims 1 and 2) train on crops of natural photos (``PhotoData``) and are measured on crops
of other photos. AR runs (claim 3) train on Fashion-MNIST encoded by the ``ar_tokenizer`` run (seed 0)
through the project's Ray job, and are measured on the Fashion-MNIST test images encoded the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from stage1_tokenizer.config import PRESETS as TOKENIZER_PRESETS
from stage1_tokenizer.config import TokenizerConfig
from stage2_ar.config import ARConfig


@dataclass(frozen=True)
class PhotoData:
    """scikit-image's bundled photos; no photo is in both splits (``experiments.photos``)."""
    train: Tuple[str, ...] = ("astronaut", "chelsea", "rocket", "motorcycle", "immunohistochemistry", "retina",
                              "hubble_deep_field", "moon", "coins")
    heldout: Tuple[str, ...] = ("coffee", "camera")
    size: int = 32                  # crop side in pixels, after halving every photo
    train_stride: int = 16          # overlapping training crops; held-out crops are disjoint (stride = size)
    min_std: float = 0.03           # drop nearly flat crops (grey-level std below 3 % of the range)
    max_per_photo: int = 240        # at most this many training crops per photo, evenly spaced (0: all)
    max_heldout_per_photo: int = 0  # the same for the held-out photos (0: all; the smoke suite keeps a few)


@dataclass(frozen=True)
class TokenizerAblation:
    """One tokenizer run: the project's trainer (``stage1_tokenizer.train``) with these settings.

    The trainer's GAN and perceptual terms are off (no discriminator steps: the budget goes to the
    reconstruction; no VGG weights offline), so the loss is L1 + 0.1 entropy + 0.25 commitment.
    """
    bits: int = 18                  # LFQ bits per token: codebook 2^bits
    decoder_norm: str = "adagn"     # "adagn" (official) or "groupnorm"
    steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    ema_decay: float = 0.99         # evaluated weights are the EMA ones, as the trainer exports
    val_every: int = 50             # held-out PSNR / SSIM / codes during training (the curves)
    log_every: int = 10
    ch: int = 16
    ch_mult: Tuple[int, ...] = (1, 2, 2)   # 4x down-sampling: 32 px -> 8x8 = 64 tokens
    num_res_blocks: int = 1
    norm_groups: int = 8

    def model(self) -> TokenizerConfig:
        base = TOKENIZER_PRESETS["tokenizer-demo"]
        return replace(base, preset=f"ablation-k{self.bits}-{self.decoder_norm}", ch=self.ch,
                       ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks, norm_groups=self.norm_groups,
                       z_channels=self.bits, decoder_norm=self.decoder_norm).validate()


@dataclass(frozen=True)
class ARAblation:
    """One AR run on the token dataset; the model is ``stage2_ar.model.FactorizedAR``.

    Optimiser and schedule follow the ``ar-demo`` recipe (AdamW (0.9, 0.95), weight decay 0.05 on every
    parameter, grad clip 1, linear warm-up, hold, linear decay to 0.1x).
    """
    bits: Tuple[int, ...] = (6, 12)
    n_inter: int = 4
    n_intra: int = 2                # 0 = independent heads over the same sub-vocabularies
    dim: int = 64
    n_head: int = 4
    ffn_multiple: int = 32
    steps: int = 250
    batch: int = 16                 # images (x 64 tokens) per step
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.05
    log_every: int = 10
    eval_every: int = 50            # held-out NLL during training (the curves), on eval_images of them
    eval_images: int = 200          # held-out images (evenly spread) of those points; the final NLL uses all
    cfg_scale: float = 2.0          # sample grids: CFG on both sub-tokens, temperature 1
    samples_per_class: int = 6

    def model(self, grid: Tuple[int, int], num_classes: int) -> ARConfig:
        return ARConfig(bits=self.bits, grid=tuple(grid), num_classes=num_classes, dim=self.dim,
                        n_head=self.n_head, n_inter=self.n_inter, n_intra=self.n_intra,
                        ffn_multiple=self.ffn_multiple, cfg_scales=(self.cfg_scale,),
                        temperatures=(1.0,)).validate()


@dataclass(frozen=True)
class FashionData:
    """Fashion-MNIST (Debian's dataset-fashion-mnist) written by ``python -m dataprep.fashion_mnist``."""
    per_class: int = 600            # training images per class (of 6,000)
    val_per_class: int = 50         # held-out images per class, from the official test set
    size: int = 32


@dataclass(frozen=True)
class Experiment:
    name: str
    kind: str                       # "baseline" | "tokenizer" | "ar"
    claim: str                      # which of the paper's claims it tests
    what: str
    tokenizer: Optional[TokenizerAblation] = None
    ar: Optional[ARAblation] = None
    baseline_bits: Tuple[int, ...] = ()   # "baseline": budgets of `tokenizer`'s grid x these bits per token


@dataclass(frozen=True)
class Suite:
    experiments: Tuple[Experiment, ...]
    seeds: Tuple[int, ...] = (0, 1)
    photos: PhotoData = field(default_factory=PhotoData)
    fashion: FashionData = field(default_factory=FashionData)
    ar_tokenizer: str = "tok-k18"   # its seed-0 tokenizer encodes Fashion-MNIST for the AR runs
    encode_cpus: int = 2            # logical CPUs of the encode job's embedded Ray (half a CPU for the tokenizer
                                    # actor, at least one for decoding: the job refuses fewer)

    def get(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        raise KeyError(f"unknown experiment {name!r}; choose from {', '.join(e.name for e in self.experiments)}")


def _experiments(tok: TokenizerAblation, ar: ARAblation) -> Tuple[Experiment, ...]:
    return (
        Experiment("tok-bicubic", "baseline", "1",
                   "no training: bicubic down-sampling, uniform quantisation, same bits per image",
                   tokenizer=tok, baseline_bits=(10, 14, 18)),
        Experiment("tok-k10", "tokenizer", "1", "LFQ, 10 bits per token (codebook 1,024)",
                   tokenizer=replace(tok, bits=10)),
        Experiment("tok-k14", "tokenizer", "1", "LFQ, 14 bits per token (codebook 16,384)",
                   tokenizer=replace(tok, bits=14)),
        Experiment("tok-k18", "tokenizer", "1, 2", "LFQ, 18 bits per token (codebook 262,144; the paper's)",
                   tokenizer=replace(tok, bits=18)),
        Experiment("tok-k18-groupnorm", "tokenizer", "2", "18 bits, decoder AdaGN replaced by plain GroupNorm",
                   tokenizer=replace(tok, bits=18, decoder_norm="groupnorm")),
        Experiment("ar-intra2", "ar", "3", "next sub-token prediction: (6, 12) bits, 2 intra blocks (the paper's)",
                   ar=replace(ar, bits=(6, 12), n_inter=ar.n_inter, n_intra=2)),
        Experiment("ar-indep", "ar", "3", "independent heads: (6, 12) bits, no intra block, 2 more inter blocks",
                   ar=replace(ar, bits=(6, 12), n_inter=ar.n_inter + 2, n_intra=0)),
        Experiment("ar-split9", "ar", "3", "symmetric split: (9, 9) bits, 2 intra blocks",
                   ar=replace(ar, bits=(9, 9), n_inter=ar.n_inter, n_intra=2)),
    )


SUITES: Dict[str, Suite] = {
    "full": Suite(_experiments(TokenizerAblation(), ARAblation())),
    "smoke": Suite(
        _experiments(TokenizerAblation(steps=2, batch=4, val_every=1, log_every=1),
                     ARAblation(steps=2, batch=4, warmup=1, log_every=1, eval_every=1, eval_images=4,
                                samples_per_class=1)),
        seeds=(0,),
        photos=PhotoData(train=("astronaut", "chelsea"), heldout=("coffee",), max_per_photo=6, max_heldout_per_photo=6),
        fashion=FashionData(per_class=3, val_per_class=2),
    ),
}
