"""Tiny AR models and batches for the model tests: random sub-tokens, heads with weights."""
import torch

from stage2_ar.config import PRESETS
from stage2_ar.model import FactorizedAR

TINY = PRESETS["ar-tiny"]


def ar_model(cfg=TINY, seed=0, head_std=0.05):
    torch.manual_seed(seed)
    m = FactorizedAR(cfg)
    for h in m.heads:  # zero heads hide every dependency; give them weights for the causality checks
        torch.nn.init.normal_(h.weight, std=head_std)
    return m.eval()


def ar_batch(cfg, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    subs = tuple(torch.randint(0, v, (b, cfg.num_tokens), generator=g) for v in cfg.vocab_sizes)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=g)
    return subs, labels
