"""How the sampler runs the model one raster position and one sub-token at a time.

Three interchangeable steppers, each with ``inter(x, t)`` -> (B, 1, D) raw inter output at position t (its
input is the embedding of token t-1, or the class embedding at t = 0) and ``intra(y, m)`` -> (B, D) normed
intra output of slot m (slot 0: the inter output, slot m >= 1: the embedding of sub-token m-1):

* ``Recompute``: the whole prefix again at every step (the benchmark baseline; no cache).
* ``Cached``: growing KV caches (``blocks.KVCache``), eager.
* ``Static``: fixed-shape KV caches (``blocks.StaticKVCache``) written at position *tensors*, so one step is
  one static graph: it can be ``torch.compile``d, and on CUDA captured as a CUDA graph
  (``mode="reduce-overhead"``), as in gpt-fast. Greedy tokens equal ``Cached``'s; logits differ only by the
  order of float sums (masked slots add exact zeros). A ``Static`` serves one batch size; the sampler
  (``stage2_ar.generate.Sampler``) keeps the ones it builds.
"""
from __future__ import annotations

from typing import Optional

import torch

from stage2_ar.blocks import StaticKVCache


class Recompute:
    def __init__(self, model):
        self.model = model
        self.prefix: Optional[torch.Tensor] = None
        self.intra_prefix: Optional[torch.Tensor] = None

    def inter(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.prefix = x if t == 0 else torch.cat([self.prefix, x], 1)
        return self.model.run_inter(self.prefix)[:, -1:]

    def intra(self, y: torch.Tensor, m: int) -> torch.Tensor:
        self.intra_prefix = y if m == 0 else torch.cat([self.intra_prefix, y], 1)
        return self.model.run_intra(self.intra_prefix)[:, -1]


class Cached:
    def __init__(self, model):
        self.model = model
        self.inter_cache = model.new_cache("inter")
        self.intra_cache = model.new_cache("intra")

    def inter(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.model.run_inter(x, start=t, cache=self.inter_cache)

    def intra(self, y: torch.Tensor, m: int) -> torch.Tensor:
        return self.model.run_intra(y, start=m, cache=self.intra_cache)[:, -1]


def cache_dtype(model, device: torch.device) -> torch.dtype:
    """Keys come out of the qkv projection: in the autocast dtype when autocast is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


class Static(torch.nn.Module):
    """Fixed batch, fixed shapes; ``compile`` = None (eager), a ``torch.compile`` mode ("default",
    "reduce-overhead" for CUDA graphs, "max-autotune"), or "eager" (capture the graphs, generate no code)."""

    def __init__(self, model, batch: int, compile: Optional[str] = None):
        super().__init__()
        cfg = model.cfg
        device = model.class_emb.weight.device
        dtype = cache_dtype(model, device)
        self.model = model
        self.inter_kv = StaticKVCache(cfg.n_inter, batch, cfg.n_head, cfg.num_tokens, cfg.head_dim, dtype, device)
        self.intra_kv = StaticKVCache(cfg.n_intra, batch, cfg.n_head, len(cfg.bits), cfg.head_dim, dtype, device)
        # one position tensor per step index, made once: a step's inputs are then the same objects every run
        self.positions = [torch.tensor([i], device=device) for i in range(max(cfg.num_tokens, len(cfg.bits)))]
        self._inter, self._intra = self._inter_step, self._intra_step
        self.graphs = compile == "reduce-overhead"
        if compile is not None:
            # "eager": graph capture only (dynamo, no code generation), a quick check of the compiled path
            opts = dict(backend="eager") if compile == "eager" else dict(mode=compile)
            self._inter = torch.compile(self._inter_step, fullgraph=True, dynamic=False, **opts)
            self._intra = torch.compile(self._intra_step, fullgraph=True, dynamic=False, **opts)

    def _inter_step(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rope = self.model.rope.index_select(0, pos)
        for i, blk in enumerate(self.model.inter):
            x = blk(x, rope, self.inter_kv.layer(i), pos)
        return x

    def _intra_step(self, y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        rope = self.model.rope.index_select(0, slot)
        for i, blk in enumerate(self.model.intra):
            y = blk(y, rope, self.intra_kv.layer(i), slot)
        return self.model.norm(y)[:, -1]

    def inter(self, x: torch.Tensor, t: int) -> torch.Tensor:
        h = self._inter(x, self.positions[t])
        return h.clone() if self.graphs else h  # a graph's output buffer is overwritten by its next replay

    def intra(self, y: torch.Tensor, m: int) -> torch.Tensor:
        o = self._intra(y, self.positions[m])
        return o.clone() if self.graphs else o
