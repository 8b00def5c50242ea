"""Configuration of the Stage-1 tokenizer (MAGVIT-v2 style encoder/decoder + LFQ) and its named presets.

The two full-size presets are the official Open-MAGVIT2 v2 tokenizers (``imagenet_lfqgan_256_L`` and
``imagenet_lfqgan_128_L``): ch 128, 18-bit LFQ, 4 residual blocks per level, GroupNorm(32, eps 1e-6), no
attention. Built from this config they have exactly the official parameter counts:
    tokenizer-16x-256: encoder 49,751,442 + decoder 65,376,387 = 115,127,829
    tokenizer-8x-128:  encoder 48,422,162 + decoder 63,599,491 = 112,021,653
Both give a 16x16 token grid at their training resolution (256/16 = 128/8 = 16).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

DECODER_NORMS = ("adagn", "groupnorm")


@dataclass(frozen=True)
class TokenizerConfig:
    preset: str = "custom"               # name recorded in checkpoints and dataset manifests
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                        # width of level 0; level i has ch * ch_mult[i] channels
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4              # per level, and in the middle of encoder and decoder
    z_channels: int = 18                 # latent channels = LFQ bits per token (codebook 2^18)
    norm_groups: int = 32
    norm_eps: float = 1e-6
    adanorm_eps: float = 1e-6            # added to the (unbiased) variance of z_q before the sqrt
    resolution: int = 256                # nominal training resolution (the nets work at any multiple of the factor)
    # Norm at the start of every decoder level: "adagn" (official: GroupNorm modulated by the quantized latent)
    # or "groupnorm" (plain affine GroupNorm, blind to the latent: the ablation of docs/ablations.md).
    decoder_norm: str = "adagn"
    # LFQ
    codebook_scale: float = 1.0          # quantized values are +-scale (official: 1.0)
    entropy_temperature: float = 0.01
    sample_entropy_weight: float = 1.0   # aux = w_s * per-sample entropy - w_c * codebook entropy
    codebook_entropy_weight: float = 1.0
    global_codebook_entropy: bool = False  # True: batch-mean distribution over all DDP ranks (official: per device)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def bits(self) -> int:
        return self.z_channels

    @property
    def codebook_size(self) -> int:
        return 2 ** self.z_channels

    def latent_shape(self, height: int, width: int) -> Tuple[int, int]:
        """Token grid (h, w) for an image of the given size; the size must divide by the factor."""
        f = self.downsample_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of the downsampling factor {f}")
        return height // f, width // f

    def validate(self) -> "TokenizerConfig":
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be non-empty and positive, got {self.ch_mult}")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} does not divide the width {self.ch * m}")
        if not 1 <= self.z_channels <= 31:
            raise ValueError(f"z_channels must be in [1, 31] (the token codec's limit), got {self.z_channels}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.decoder_norm not in DECODER_NORMS:
            raise ValueError(f"decoder_norm must be one of {', '.join(DECODER_NORMS)}, got {self.decoder_norm!r}")
        if self.entropy_temperature <= 0 or self.codebook_scale <= 0:
            raise ValueError("entropy_temperature and codebook_scale must be positive")
        return self


_OFFICIAL = TokenizerConfig()

PRESETS: Dict[str, TokenizerConfig] = {
    # Official 256x256 tokenizer: 5 levels, 4 downsamplings -> 16x16x18 latent.
    "tokenizer-16x-256": replace(_OFFICIAL, preset="tokenizer-16x-256", ch_mult=(1, 1, 2, 2, 4), resolution=256),
    # Official 128x128 tokenizer: 4 levels, 3 downsamplings -> 16x16x18 latent.
    "tokenizer-8x-128": replace(_OFFICIAL, preset="tokenizer-8x-128", ch_mult=(1, 2, 2, 4), resolution=128),
    # Unit tests: same code, a few hundred thousand weights at most; still 18-bit tokens, 2x downsampling.
    "tokenizer-tiny": replace(
        _OFFICIAL, preset="tokenizer-tiny", ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16
    ),
    # CPU demo: 32x32 images, 8x downsampling -> 4x4 = 16 tokens of 18 bits (288 bits per image: enough for
    # Fashion-MNIST shapes, and short sequences let the demo's AR model learn within minutes on 2 cores).
    "tokenizer-demo": replace(
        _OFFICIAL, preset="tokenizer-demo", ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32
    ),
}
