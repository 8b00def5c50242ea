"""The Stage-1 tokenizer: encoder -> LFQ -> decoder, with the API the other stages use.

    tok = Tokenizer.from_checkpoint("runs/tok/step-00010000")
    tok = Tokenizer.from_pretrained("hf://TencentARC/Open-MAGVIT2-Tokenizer-256-resolution")  # any model reference
    idx = tok.encode(images)                # (B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) int64, 18-bit indices
    out = tok.decode(idx)                   # -> (B, 3, H, W)
    rec, q = tok(images)                    # training: reconstruction + QuantizerOutput (losses)

``encode``/``decode``/``reconstruct`` run without autograd and accept ``precision='bf16'`` (autocast) for
speed; call ``tok.channels_last()`` once to switch the conv weights (and inputs) to NHWC. Any image size that
is a multiple of the downsampling factor works (the nets are fully convolutional; AdaGN is global).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from shared.checkpoint import CheckpointError, load_meta, load_weights, save_checkpoint
from shared.config import from_dict, to_dict
from shared.device import autocast
from shared.tokens import index_to_bits
from stage1_tokenizer.config import TokenizerConfig
from stage1_tokenizer.lfq import LFQ, QuantizerOutput
from stage1_tokenizer.model import Decoder, Encoder

CHECKPOINT_KIND = "tokenizer"


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = Encoder(cfg)
        self.quantizer = LFQ(
            bits=cfg.z_channels,
            scale=cfg.codebook_scale,
            temperature=cfg.entropy_temperature,
            sample_entropy_weight=cfg.sample_entropy_weight,
            codebook_entropy_weight=cfg.codebook_entropy_weight,
            global_codebook_entropy=cfg.global_codebook_entropy,
        )
        self.decoder = Decoder(cfg)
        self._channels_last = False

    # --- facts other stages read -------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    @property
    def bits(self) -> int:
        return self.cfg.z_channels

    def latent_shape(self, height: int, width: int) -> Tuple[int, int]:
        return self.cfg.latent_shape(height, width)

    # --- differentiable pieces -----------------------------------------------------------------------
    def _prepare(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected images (B, {self.cfg.in_channels}, H, W), got shape {tuple(images.shape)}")
        self.latent_shape(images.shape[2], images.shape[3])  # raises on a size the factor does not divide
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def encode_latent(self, images: Tensor) -> Tensor:
        """Pre-quantization latent (B, z_channels, h, w)."""
        return self.encoder(self._prepare(images))

    def quantize(self, z: Tensor, with_losses: Optional[bool] = None) -> QuantizerOutput:
        """LFQ of a latent; losses computed in training mode unless ``with_losses`` says otherwise."""
        return self.quantizer(z, with_losses)

    def decode_latent(self, zq: Tensor) -> Tensor:
        """Quantized latent (B, z_channels, h, w), values +-scale -> images."""
        if self._channels_last:
            zq = zq.contiguous(memory_format=torch.channels_last)
        return self.decoder(zq)

    def indices_to_latent(self, indices: Tensor) -> Tensor:
        """(B, h, w) indices -> (B, z_channels, h, w) quantized latent (+-scale per bit, little-endian)."""
        if indices.dim() != 3:
            raise ValueError(f"expected indices (B, h, w), got shape {tuple(indices.shape)}")
        if indices.dtype.is_floating_point or indices.min() < 0 or indices.max() >= self.cfg.codebook_size:
            raise ValueError(f"indices must be integers in [0, 2^{self.bits})")
        bits = index_to_bits(indices, self.bits, signed=True, dtype=torch.float32) * self.cfg.codebook_scale
        return bits.movedim(-1, 1).contiguous()

    def forward(self, images: Tensor) -> Tuple[Tensor, QuantizerOutput]:
        """Training forward: (reconstruction, QuantizerOutput with the LFQ loss breakdown)."""
        q = self.quantize(self.encode_latent(images))
        return self.decode_latent(q.quantized), q

    # --- inference API -------------------------------------------------------------------------------
    def _autocast(self, precision: str):
        return autocast(next(self.parameters()).device, precision)

    @torch.inference_mode()
    def encode(self, images: Tensor, precision: str = "fp32") -> Tensor:
        """Images in [-1, 1] -> (B, h, w) int64 token indices. bf16 may flip bits whose latent is near 0."""
        with self._autocast(precision):
            z = self.encode_latent(images)
        return self.quantizer.indices(z.float())

    @torch.inference_mode()
    def decode(self, indices: Tensor, precision: str = "fp32") -> Tensor:
        """(B, h, w) token indices -> (B, 3, h*f, w*f) float32 images (not clamped)."""
        zq = self.indices_to_latent(indices.to(next(self.parameters()).device))
        with self._autocast(precision):
            return self.decode_latent(zq).float()

    @torch.inference_mode()
    def reconstruct(self, images: Tensor, precision: str = "fp32") -> Tensor:
        with self._autocast(precision):
            z = self.encode_latent(images)
            q = self.quantize(z.float(), with_losses=False)
            return self.decode_latent(q.quantized).float()

    def channels_last(self) -> "Tokenizer":
        """Switch conv weights and inputs to NHWC (usually faster for convs on CPU and GPU)."""
        self.to(memory_format=torch.channels_last)
        self._channels_last = True
        return self

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self, path: Union[str, Path], extra: Optional[Dict[str, Any]] = None, trainer_state=None,
             overwrite: bool = False, show_progress: bool = False) -> Path:
        """Write a checkpoint directory; an existing ``path`` is replaced only if it is a tokenizer checkpoint
        (or empty), unless ``overwrite`` (``shared.checkpoint.save_checkpoint``)."""
        return save_checkpoint(path, self.state_dict(), to_dict(self.cfg), kind=CHECKPOINT_KIND,
                               trainer_state=trainer_state, extra=extra, overwrite=overwrite,
                               show_progress=show_progress)

    @classmethod
    def empty(cls, cfg: TokenizerConfig) -> "Tokenizer":
        """A tokenizer with uninitialised weights on the CPU, for a strict load that replaces every one of them
        (skips the random init; the model keeps no buffer outside its state dict)."""
        with torch.device("meta"):
            model = cls(cfg)
        return model.to_empty(device="cpu")

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "Tokenizer":
        """Build from a checkpoint directory (kind "tokenizer"), load strictly, eval mode."""
        meta = load_meta(path)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, expected {CHECKPOINT_KIND!r}")
        model = cls.empty(from_dict(TokenizerConfig, meta["config"]))
        load_weights(model, path, kind=CHECKPOINT_KIND)
        return model.to(device).eval()

    @classmethod
    def from_pretrained(cls, ref: Union[str, Path], device: Union[str, torch.device] = "cpu",
                        weights: Optional[str] = None) -> "Tokenizer":
        """Build from any model reference (``shared.model_ref``): a checkpoint directory, an official ``.ckpt``
        (a tokenizer release, or the tokenizer half of an AR release) or ``hf://ORG/REPO[/FILE][@REVISION]``;
        official files are converted once and cached. ``weights``: "ema" / "raw" (None: EMA when the file
        has them). The provenance record (``Resolved.record()``) is kept as ``model.provenance``."""
        from stage1_tokenizer.convert_official import resolve_tokenizer

        resolved = resolve_tokenizer(ref, weights)
        model = cls.from_checkpoint(resolved.path, device)
        model.provenance = resolved.record()
        return model
