"""PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``), as the official tokenizer uses.

Layout with ndf 64 and 3 layers (reference §3), kernel 4, padding 1:
    conv 3->64 s2 (bias) . LReLU
    conv 64->128 s2 . BN . LReLU      conv 128->256 s2 . BN . LReLU
    conv 256->512 s1 . BN . LReLU     conv 512->1 s1 (bias)
Convs followed by BatchNorm have no bias. Key names ``main.{0,2,3,5,6,8,9,11}`` match the official
``loss.discriminator.main.*`` so weights can be carried over; 2,765,633 parameters.
Output: one logit per overlapping patch, (B, 1, H/8 - 2, W/8 - 2) for H, W >= 32.
"""
from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self._official_init()

    def _official_init(self) -> None:
        # pix2pix init, as the official ``weights_init``: conv weights N(0, 0.02), conv biases keep PyTorch's
        # default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) drawn at construction; BN scale N(1, 0.02), shift 0.
        # The draws follow module order, so a seed gives the official initial weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
