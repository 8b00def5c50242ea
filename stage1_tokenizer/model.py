"""MAGVIT-v2 style convolutional encoder and decoder (the Open-MAGVIT2 v2 architecture).

No attention anywhere. Swish activations, GroupNorm(32, eps 1e-6). Levels are indexed by resolution:
level 0 works at full image resolution, level L-1 at the token grid. The encoder runs levels 0 -> L-1 and
halves the resolution after every level but the last (strided 3x3 conv); the decoder runs L-1 -> 0, starts
every level with an AdaptiveGroupNorm conditioned on the quantized latent (``decoder_norm="groupnorm"``: a
plain GroupNorm instead, for the ablation) and doubles the resolution after every level but level 0 (3x3 conv
to 4C channels, then depth-to-space x2).

Which convs carry a bias follows the official nets exactly (this is what makes the parameter counts match):
encoder stem and all residual-block convs have none; downsampling convs, the 1x1 latent projection, and the
decoder's stem, upsampling and output convs do.

Module names are ours; ``convert_official`` maps the official names onto them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1_tokenizer.config import TokenizerConfig


def group_norm(cfg: TokenizerConfig, channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=affine)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, swish, conv3x3) x 2, bias-free convs; 1x1 shortcut on a width change."""

    def __init__(self, cfg: TokenizerConfig, cin: int, cout: int):
        super().__init__()
        self.norm_a = group_norm(cfg, cin)
        self.conv_a = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm_b = group_norm(cfg, cout)
        self.conv_b = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_a(F.silu(self.norm_a(x)))
        h = self.conv_b(F.silu(self.norm_b(h)))
        return self.skip(x) + h


def res_stack(cfg: TokenizerConfig, cin: int, cout: int) -> nn.Sequential:
    """num_res_blocks blocks; the first one changes the width."""
    return nn.Sequential(*[ResBlock(cfg, cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)])


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then a per-channel scale and shift predicted from the quantized latent.

    The condition is global per image: for each latent channel, its std over the token grid drives the scale
    (scale = Linear(std), used as is, not 1 + ...) and its mean drives the shift (shift = Linear(mean)).
    The variance is torch's default unbiased one (divide by n - 1), as in the official code.
    """

    def __init__(self, cfg: TokenizerConfig, channels: int):
        super().__init__()
        self.norm = group_norm(cfg, channels, affine=False)
        self.to_scale = nn.Linear(cfg.z_channels, channels)
        self.to_shift = nn.Linear(cfg.z_channels, channels)
        self.var_eps = cfg.adanorm_eps

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        flat = zq.flatten(2).float()
        # A 1x1 token grid has no unbiased variance (n - 1 = 0): fall back to the biased one there.
        var = flat.var(-1, correction=1 if flat.shape[-1] > 1 else 0)
        scale = self.to_scale(torch.sqrt(var + self.var_eps))
        shift = self.to_shift(flat.mean(-1))
        return self.norm(x) * scale[:, :, None, None] + shift[:, :, None, None]


class Upsample(nn.Module):
    """3x3 conv C -> 4C, then depth-to-space x2 with nn.PixelShuffle (channel c*4 + 2*dy + dx -> pixel (dy, dx)).

    The official upsampler uses the other (DCR) channel order; ``convert_official`` permutes its weights.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1, bias=True)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.conv(x))


class EncoderLevel(nn.Module):
    def __init__(self, cfg: TokenizerConfig, cin: int, cout: int, downsample: bool):
        super().__init__()
        self.blocks = res_stack(cfg, cin, cout)
        self.down = nn.Conv2d(cout, cout, 3, stride=2, padding=1, bias=True) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return self.down(x) if self.down is not None else x


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, z_channels, H/f, W/f) pre-quantization latent, f = 2^(levels - 1)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.stem = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        self.levels = nn.ModuleList(
            EncoderLevel(cfg, cfg.ch if i == 0 else widths[i - 1], widths[i], downsample=i < n - 1) for i in range(n)
        )
        self.mid = res_stack(cfg, widths[-1], widths[-1])
        self.out_norm = group_norm(cfg, widths[-1])
        self.to_latent = nn.Conv2d(widths[-1], cfg.z_channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for level in self.levels:
            x = level(x)
        x = self.mid(x)
        return self.to_latent(F.silu(self.out_norm(x)))


class DecoderLevel(nn.Module):
    def __init__(self, cfg: TokenizerConfig, cin: int, cout: int, upsample: bool):
        super().__init__()
        self.adaptive = cfg.decoder_norm == "adagn"
        if self.adaptive:
            self.adanorm = AdaptiveGroupNorm(cfg, cin)
        else:  # ablation: a plain affine GroupNorm under another name, so no AdaGN checkpoint loads into it
            self.norm = group_norm(cfg, cin)
        self.blocks = res_stack(cfg, cin, cout)
        self.up = Upsample(cout) if upsample else None

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        x = self.blocks(self.adanorm(x, zq) if self.adaptive else self.norm(x))
        return self.up(x) if self.up is not None else x


class Decoder(nn.Module):
    """(B, z_channels, h, w) quantized latent -> (B, 3, h*f, w*f) image in about [-1, 1] (no output activation)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.from_latent = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1, bias=True)
        self.mid = res_stack(cfg, widths[-1], widths[-1])
        # Level i takes the width of level i + 1 (it runs right after it) and produces its own width.
        self.levels = nn.ModuleList(
            DecoderLevel(cfg, widths[min(i + 1, n - 1)], widths[i], upsample=i > 0) for i in range(n)
        )
        self.out_norm = group_norm(cfg, widths[0])
        self.to_rgb = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1, bias=True)

    def forward(self, zq: Tensor) -> Tensor:
        x = self.mid(self.from_latent(zq))
        for level in reversed(self.levels):
            x = level(x, zq)
        return self.to_rgb(F.silu(self.out_norm(x)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
