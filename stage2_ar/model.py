"""Factorized auto-regressive transformer with next sub-token prediction (Open-MAGVIT2 Stage 2).

Each 18-bit token is split into M sub-tokens (default bits (6, 12): 64-way and 4096-way). Two stacks of
the same Llama block:

  inter ("spatial"): causal over the h*w raster positions. Input at position 0 is the class embedding
      (the start token), at position t >= 1 the sum of the sub-token embeddings of token t-1.
  intra ("factorized"): for every position separately, a causal sequence of length M:
      [inter output h_t (raw, no final norm), emb_0(sub_0), ..., emb_{M-2}(sub_{M-2})],
      with the same embedding tables as the inter input. Output m goes through the shared final norm
      and head m to predict sub-token m.

With ``n_intra = 0`` (the ablation of docs/ablations.md) there is no intra transformer: every head m reads
the normed inter output h_t directly, so the M sub-tokens of a position are predicted independently of each
other (same sub-vocabularies, no next sub-token prediction).

Loss = sum over sub-tokens of the cross-entropy, mean over tokens; with zero-initialised heads a fresh model
gives exactly sum_m ln V_m (ln 64 + ln 4096 = 12.4766 for (6, 12)).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import checkpoint as ckpt
from shared.config import from_dict, to_dict
from shared.tokens import join_index, split_index
from stage2_ar.blocks import Block, KVCache, RMSNorm
from stage2_ar.config import ARConfig
from stage2_ar.rope import rope_table

CHECKPOINT_KIND = "ar"


def subtoken_loss(logits: Sequence[torch.Tensor], subtokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over sub-tokens of the mean cross-entropy (fp32), i.e. the official loss."""
    return sum(F.cross_entropy(lg.flatten(0, -2).float(), st.flatten()) for lg, st in zip(logits, subtokens))


class FactorizedAR(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, hidden = cfg.dim, cfg.ffn_hidden

        def block():
            return Block(d, cfg.n_head, hidden, cfg.norm_eps, cfg.resid_dropout)

        self.tok_emb = nn.ModuleList(nn.Embedding(v, d) for v in cfg.vocab_sizes)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d)  # last row: null class (CFG)
        self.drop = nn.Dropout(cfg.embed_dropout)
        self.inter = nn.ModuleList(block() for _ in range(cfg.n_inter))
        self.intra = nn.ModuleList(block() for _ in range(cfg.n_intra))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(d, v, bias=False) for v in cfg.vocab_sizes)
        # Not a parameter and not saved: recomputed from the config, so state_dict matches the official keys.
        self.register_buffer("rope", rope_table(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.rope_zero_cls),
                             persistent=False)
        self.apply(self._init_weights)
        for head in self.heads:
            nn.init.zeros_(head.weight)

    def _apply(self, fn, *args, **kwargs):
        # Keep the RoPE table in fp32 when the model is cast (e.g. .to(torch.bfloat16)): angles up to
        # ~h radians lose too much in bf16.
        out = super()._apply(fn, *args, **kwargs)
        if self.rope.dtype != torch.float32:
            c = self.cfg
            self.rope = rope_table(c.grid, c.head_dim, c.rope_base, c.rope_zero_cls).to(self.rope.device)
        return out

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)

    # ---- pieces (also used step by step by the sampler) ----

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    @property
    def num_subtokens(self) -> int:
        return len(self.cfg.bits)

    @property
    def independent_heads(self) -> bool:
        """No intra blocks: every head reads the inter output (n_intra = 0)."""
        return self.cfg.n_intra == 0

    def split(self, indices: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Full token indices (any shape) -> tuple of sub-tokens, lowest bits first."""
        return split_index(indices, self.cfg.bits)

    def join(self, subtokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return join_index(subtokens, self.cfg.bits)

    def embed(self, subtokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of the per-sub-token embeddings: (B, L) each -> (B, L, D)."""
        return sum(emb(st) for emb, st in zip(self.tok_emb, subtokens))

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cfg.class_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def run_inter(self, x: torch.Tensor, start: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Inter blocks over positions start .. start+L-1 (position 0 = class slot); raw last-block output."""
        rope = self.rope[start:start + x.shape[1]]
        for i, blk in enumerate(self.inter):
            x = blk(x, rope, cache.layer(i) if cache is not None else None, start)
        return x

    def run_intra(self, x: torch.Tensor, start: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Intra blocks over sub-token slots start .. start+L-1, then the shared final norm."""
        rope = self.rope[start:start + x.shape[1]]  # slot 0: the class row (zeros), slot 1: grid (0, 0)...
        for i, blk in enumerate(self.intra):
            x = blk(x, rope, cache.layer(i) if cache is not None else None, start)
        return self.norm(x)

    def new_cache(self, which: str) -> KVCache:
        """Empty KV cache for the 'inter' (h*w positions) or 'intra' (M slots) blocks."""
        if which == "inter":
            return KVCache(self.cfg.n_inter, self.cfg.num_tokens)
        return KVCache(self.cfg.n_intra, self.num_subtokens)

    # ---- training / teacher-forced forward ----

    def forward(self, subtokens: Sequence[torch.Tensor], labels: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """subtokens: M tensors (B, T) long (T <= h*w, raster order); labels (B,) -> M logits (B, T, V_m)."""
        M = self.num_subtokens
        if len(subtokens) != M:
            raise ValueError(f"expected {M} sub-token tensors for bits {self.cfg.bits}, got {len(subtokens)}")
        b, t = subtokens[0].shape
        if t > self.cfg.num_tokens:
            raise ValueError(f"sequence of {t} tokens is longer than the {self.cfg.grid} grid")
        labels = self.drop_labels(labels)
        tok = self.embed(subtokens)                                       # (B, T, D)
        x = torch.cat([self.class_emb(labels)[:, None], tok[:, :-1]], 1)  # start token, tokens 0..T-2
        h = self.run_inter(self.drop(x))                                  # (B, T, D)
        if self.independent_heads:
            y = self.norm(h)
            return tuple(head(y) for head in self.heads)
        # Intra sequences: [h_t, emb_0(sub_0), ..., emb_{M-2}(sub_{M-2})] for every position t.
        seq = [h] + [self.tok_emb[m](subtokens[m]) for m in range(M - 1)]
        y = self.run_intra(torch.stack(seq, dim=2).flatten(0, 1))          # (B*T, M, D)
        y = y.view(b, t, M, -1)
        return tuple(self.heads[m](y[:, :, m]) for m in range(M))

    def loss(self, subtokens: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sum of the sub-token cross-entropies, mean over tokens."""
        return subtoken_loss(self(subtokens, labels), subtokens)

    # ---- checkpoints (our format: safetensors + config.json, kind "ar") ----

    def save(self, path, *, extra: Optional[Dict[str, Any]] = None, trainer_state: Optional[Dict[str, Any]] = None):
        return ckpt.save_checkpoint(path, self.state_dict(), to_dict(self.cfg), kind=CHECKPOINT_KIND,
                                    trainer_state=trainer_state, extra=extra)

    @classmethod
    def empty(cls, cfg: ARConfig) -> "FactorizedAR":
        """A model with uninitialised weights on the CPU, for a strict load that replaces every one of them:
        skips the random init (seconds for ar-XL's 1.5B parameters), and the RoPE table is computed as usual."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        model.rope = rope_table(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.rope_zero_cls)
        return model

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "FactorizedAR":
        meta = ckpt.load_meta(path)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise ckpt.CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, expected {CHECKPOINT_KIND!r}")
        model = cls.empty(from_dict(ARConfig, meta["config"]))
        ckpt.load_strict(model, ckpt.load_state_dict(path), source=str(path))
        return model.to(device).eval()

    @classmethod
    def from_pretrained(cls, ref, device="cpu", *, grid: Optional[Tuple[int, int]] = None,
                        head_dim: Optional[int] = None) -> "FactorizedAR":
        """Build from any model reference (``shared.model_ref``): a checkpoint directory (or a converter's OUT),
        an official AR ``.ckpt`` or ``hf://ORG/REPO[/FILE][@REVISION]``; official files are converted once and
        cached (``stage2_ar.convert_official.resolve_ar``; ``grid`` / ``head_dim`` only for unreleased
        architectures). The provenance record is kept as ``model.provenance``."""
        from stage2_ar.convert_official import resolve_ar

        resolved = resolve_ar(ref, grid=grid, head_dim=head_dim)
        model = cls.from_checkpoint(resolved.path, device)
        model.provenance = resolved.record()
        return model


def count_params(cfg: ARConfig) -> int:
    """Exact parameter count, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = FactorizedAR(cfg)
    return sum(p.numel() for p in model.parameters())
