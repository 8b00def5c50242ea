"""Configuration of the factorized AR transformer (Stage 2) and its named presets.

Sizes of the official models (Open-MAGVIT2 v2, ``imagenet_conditional_llama_{B,L,XL}``): head_dim 64,
256 image tokens (16x16 grid), sub-token split (6, 12), 1000 classes. With these presets the parameter
counts are exactly the official ones: 343,570,432 / 804,362,240 / 1,486,679,040.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple


@dataclass(frozen=True)
class ARConfig:
    bits: Tuple[int, ...] = (6, 12)      # sub-token split of the 18-bit token, lowest bits first
    grid: Tuple[int, int] = (16, 16)     # token grid (h, w): 16x16 for 256px images with a 16x tokenizer
    num_classes: int = 1000              # the class table has num_classes + 1 rows; the last is the null class
    dim: int = 1024
    n_head: int = 16
    n_inter: int = 24                    # "spatial" blocks: causal over the h*w positions
    n_intra: int = 2                     # "factorized" blocks: causal over the M sub-tokens of one position;
                                         # 0 = independent heads, each reading the inter output (ablation)
    ffn_multiple: int = 256              # SwiGLU hidden = round_up(int(2 * 4 * dim / 3), ffn_multiple)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_zero_cls: bool = True           # official quirk: class slot / intra position 0 get q = k = 0
    class_dropout: float = 0.1           # label -> null class during training (for CFG)
    embed_dropout: float = 0.1           # dropout on the whole inter input sequence
    resid_dropout: float = 0.1           # after the attention projection and after the FFN
    init_std: float = 0.02
    # Sampling defaults (order = sub-tokens, lowest bits first); empty = 1.0 each, i.e. no guidance.
    cfg_scales: Tuple[float, ...] = ()
    temperatures: Tuple[float, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def vocab_sizes(self) -> Tuple[int, ...]:
        return tuple(1 << b for b in self.bits)

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        return -(-h // self.ffn_multiple) * self.ffn_multiple

    def validate(self) -> "ARConfig":
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            # 2D RoPE: head_dim/2 pairs, half of them for the row and half for the column
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4")
        if self.n_inter < 1 or self.n_intra < 0:
            raise ValueError(f"need n_inter >= 1 and n_intra >= 0, got {self.n_inter} and {self.n_intra}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (h, w) with positive sides, got {self.grid}")
        if not self.bits or min(self.bits) < 1 or sum(self.bits) > 31:
            raise ValueError(f"bits must be positive and sum to at most 31, got {self.bits}")
        if len(self.bits) > self.num_tokens + 1:
            raise ValueError(f"{len(self.bits)} sub-tokens need more intra RoPE rows than the grid provides")
        for name in ("cfg_scales", "temperatures"):
            v = getattr(self, name)
            if v and len(v) not in (1, len(self.bits)):
                raise ValueError(f"{name} must have 1 or {len(self.bits)} entries (one per sub-token), got {v}")
        return self


_OFFICIAL = dict(bits=(6, 12), grid=(16, 16), num_classes=1000)

# Paper FID sampling settings (50 images per class, top-k/top-p off); order (pre, post).
PRESETS: Dict[str, ARConfig] = {
    "ar-B": ARConfig(**_OFFICIAL, dim=1024, n_head=16, n_inter=24, n_intra=2,
                     cfg_scales=(1.9, 2.0), temperatures=(1.0, 1.0)),
    "ar-L": ARConfig(**_OFFICIAL, dim=1280, n_head=20, n_inter=36, n_intra=3,
                     cfg_scales=(1.9, 1.9), temperatures=(1.1, 1.0)),
    "ar-XL": ARConfig(**_OFFICIAL, dim=1536, n_head=24, n_inter=48, n_intra=4,
                      cfg_scales=(1.75, 1.85), temperatures=(1.1, 1.0)),
    # Tests: a few hundred thousand parameters, a 4x4 grid, 10 classes.
    "ar-tiny": ARConfig(bits=(6, 12), grid=(4, 4), num_classes=10, dim=64, n_head=4, n_inter=2, n_intra=1,
                        ffn_multiple=32),
    # CPU demo on the 4x4 token grids of the demo tokenizer (32px Fashion-MNIST), 10 classes; ~2M weights so
    # that a few minutes on 2 cores give about a thousand steps.
    "ar-demo": ARConfig(bits=(6, 12), grid=(4, 4), num_classes=10, dim=128, n_head=4, n_inter=4, n_intra=1,
                        ffn_multiple=64, cfg_scales=(2.0, 2.0), temperatures=(1.0, 1.0)),
}


def with_overrides(cfg: ARConfig, **kw) -> ARConfig:
    return replace(cfg, **kw).validate()
