"""Exponential moving average of the generator weights (official: decay 0.999, no warm-up, every step).

The EMA copy is what evaluation and export use (reference §3: ``use_ema: True``). Buffers (none in the
tokenizer today besides non-persistent LFQ tables) are copied, not averaged.

The decay is rounded to float32, as the official ``LitEma`` keeps it in a float32 buffer: 0.999 becomes
0.99900001287..., so each update moves the average by 9.9998713e-4 (not 1e-3) of the gap to the weights.
(The official EMA also shadows the discriminator; that copy is never used, so it is not kept here.)
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn


def float32_decay(decay: float) -> float:
    """``decay`` as the float32 number the official LitEma buffer holds (exactly representable as a float)."""
    return float(torch.tensor(decay, dtype=torch.float32))


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = float32_decay(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- ema - (1 - decay) * (ema - current), parameter by parameter (1 - decay is exact in float32)."""
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - self.decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def train(self, mode: bool = True) -> "EMA":
        return super().train(False)

    def weights(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()
