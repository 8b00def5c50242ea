"""Lookup-free quantization (LFQ) with a 2^K codebook and its entropy loss, computed exactly and cheaply.

Quantization: every latent channel is one bit. q_c = +s where z_c > 0, else -s (exactly 0 -> -s), with a
straight-through gradient. The token index is little-endian over channels (channel c = bit c), the
convention of ``shared.tokens`` and of the official v2 release.

Entropy loss, as the official code defines it: each token's distribution over all 2^K codes c in {-s,+s}^K
is softmax_c(2 z.c / tau). Materialising it costs N x 2^K numbers (2^18 = 262,144 per token). We never do:

* 2 z.c = sum_k 2 z_k c_k, so the softmax is a product of independent bits with
  P(bit k = 1) = exp(2 s z_k/tau) / (exp(2 s z_k/tau) + exp(-2 s z_k/tau)) = sigmoid(4 s z_k / tau).
  The per-token entropy is then the sum of K binary entropies.
* The batch-mean distribution p_bar(c) = 1/N sum_n prod_k P_nk(c_k) is not a product, but splitting the
  bits into a low group (K1 bits) and a high group (K2 = K - K1 bits) makes it a matrix product:
  p_bar[lo, hi] = 1/N sum_n A[n, lo] B[n, hi] = (A^T B / N)[lo, hi], where A (N x 2^K1) and B (N x 2^K2)
  are the per-token distributions of each group. For K = 18 that is two N x 512 matrices and one
  512 x 512 result holding all 2^18 probabilities, exact.
* The sum over tokens runs in chunks, and its backward (derived by hand in _PairedCodeSum) recomputes the
  group distributions instead of storing them: beyond the 2^K result, memory does not grow with N.
The codebook entropy keeps the official form -sum p_bar log(p_bar + 1e-5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared import collectives
from shared.tokens import bits_to_index

CODEBOOK_LOG_EPS = 1e-5  # official: -sum p log(p + 1e-5)


def sign_quantize(z: Tensor, scale: float = 1.0) -> Tensor:
    """+scale where z > 0, else -scale (0 maps to -scale), same dtype as z, no gradient."""
    pos = torch.full((), scale, dtype=z.dtype, device=z.device)
    return torch.where(z > 0, pos, -pos)


def _code_bits(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2^k, k) {0,1} matrix; row j holds the little-endian bits of j."""
    j = torch.arange(1 << k, device=device)
    return ((j[:, None] >> torch.arange(k, device=device)) & 1).to(dtype)


def _group_probs(log_neg: Tensor, log_pos: Tensor) -> Tensor:
    """(N, k) per-bit log-probabilities -> (N, 2^k) probability of every k-bit code, little-endian.

    log P(code j) = sum_k [bit_k(j)] log p_k + [1 - bit_k(j)] log(1 - p_k): one small matmul in log space,
    then exp. Saturated bits give very negative logs and underflow to exact zeros, never NaN.
    """
    bits = _code_bits(log_neg.shape[1], log_neg.dtype, log_neg.device)
    return torch.exp(log_neg @ (1 - bits).T + log_pos @ bits.T)


# Tokens per chunk in the codebook sum: 512 tokens x 2^9 codes x 4 bytes = 1 MiB per group matrix.
CHUNK_TOKENS = 512


class _PairedCodeSum(torch.autograd.Function):
    """S = sum_n A_n^T B_n, the (2^K1, 2^K2) un-normalised batch sum of per-token code distributions.

    Input: u = 4 s z / tau, (N, K); bit k of token n is 1 with probability sigmoid(u_nk). A (N, 2^K1) and
    B (N, 2^K2) are the per-token distributions of the low and high bit groups. Both passes walk over the
    tokens in chunks and only ``u`` is saved: the backward recomputes A and B, so memory stays
    O(chunk * 2^(K/2) + 2^K) whatever N is.

    Backward, exactly: dA = B dS^T and dB = A dS; and since log A[n, i] = sum_k b_ik log s(u_nk) +
    (1 - b_ik) log s(-u_nk), dA[n, i]/du_nk = A[n, i] (b_ik - p_nk), so
    du_nk = sum_i (dA * A)[n, i] b_ik - p_nk sum_i (dA * A)[n, i]  (and the same for the high group).
    """

    @staticmethod
    def _groups(u: Tensor, k1: int) -> Tuple[Tensor, Tensor]:
        log_neg, log_pos = F.logsigmoid(-u), F.logsigmoid(u)
        return _group_probs(log_neg[:, :k1], log_pos[:, :k1]), _group_probs(log_neg[:, k1:], log_pos[:, k1:])

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        k = u.shape[1]
        k1 = k // 2  # K = 18 -> 9 + 9: N x 512 factors and a 512 x 512 = 2^18 result
        total = u.new_zeros(1 << k1, 1 << (k - k1))
        for uc in u.split(CHUNK_TOKENS):
            a, b = _PairedCodeSum._groups(uc, k1)
            total.addmm_(a.T, b)
        ctx.save_for_backward(u)
        return total

    @staticmethod
    def backward(ctx, d_total: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        k = u.shape[1]
        k1 = k // 2
        bits_lo = _code_bits(k1, u.dtype, u.device)
        bits_hi = _code_bits(k - k1, u.dtype, u.device)
        du = torch.empty_like(u)
        for uc, duc in zip(u.split(CHUNK_TOKENS), du.split(CHUNK_TOKENS)):
            a, b = _PairedCodeSum._groups(uc, k1)
            p = torch.sigmoid(uc)
            m_a = (b @ d_total.T).mul_(a)  # dA * A
            m_b = (a @ d_total).mul_(b)    # dB * B
            duc[:, :k1] = m_a @ bits_lo - p[:, :k1] * m_a.sum(1, keepdim=True)
            duc[:, k1:] = m_b @ bits_hi - p[:, k1:] * m_b.sum(1, keepdim=True)
        return du


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, with a summing backward.

    Every rank computes the same global codebook entropy from the summed distribution. DDP then averages
    the per-rank gradients, i.e. divides by the world size; summing the incoming gradients here
    multiplies by it, so each rank ends with the exact gradient of the global term w.r.t. its own tokens.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return collectives.all_reduce_(x.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return collectives.all_reduce_(grad.clone())


def _logits(z: Tensor, temperature: float, scale: float) -> Tensor:
    """(..., K) latents -> (N, K) per-bit logits u = 4 s z / tau, in float32 (or float64)."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    return z.to(dtype).reshape(-1, z.shape[-1]) * (4.0 * scale / temperature)


def _codebook_sums(u: Tensor, global_batch: bool) -> Tuple[Tensor, Tensor]:
    """Un-normalised (2^K1, 2^K2) code distribution summed over tokens (and ranks), and the token count."""
    total = _PairedCodeSum.apply(u)
    n = torch.tensor(float(u.shape[0]), dtype=total.dtype, device=total.device)
    if global_batch and collectives.active():
        total = _AllReduceSum.apply(total)
        collectives.all_reduce_(n)
    return total, n


def codebook_distribution(z: Tensor, temperature: float, scale: float = 1.0, global_batch: bool = False) -> Tensor:
    """Exact batch-mean code distribution p_bar, shape (2^K,), in token-index order (little-endian).

    ``z`` is (..., K): tokens on the leading dims, bits last. With ``global_batch`` the mean runs over the
    tokens of all ranks of the default process group (autograd-correct under DDP, see _AllReduceSum).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        total, n = _codebook_sums(_logits(z, temperature, scale), global_batch)
    # total[lo, hi] is code lo + 2^K1 * hi; the transposed flatten puts the codes in index order.
    return (total / n).T.reshape(-1)


def entropy_terms(
    z: Tensor, temperature: float = 0.01, scale: float = 1.0, global_batch: bool = False
) -> Tuple[Tensor, Tensor]:
    """(per-sample entropy, codebook entropy) of the official LFQ entropy loss, exactly, in O(N 2^(K/2) + 2^K).

    ``z``: (..., K) pre-quantization latents, tokens on the leading dims and the K bits last. Both results
    are scalars in nats. Computed in float32 (float64 if z is float64) with autocast off: the
    probabilities at tau = 0.01 are far too sharp for bf16. Differentiable once (no double backward).
    """
    if z.shape[-1] < 1 or z.numel() == 0:
        raise ValueError(f"entropy_terms needs (..., K) latents with at least one token, got shape {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        u = _logits(z, temperature, scale)
        log_neg, log_pos = F.logsigmoid(-u), F.logsigmoid(u)
        # Sum of K binary entropies per token, then the mean over tokens.
        per_sample = -(log_pos.exp() * log_pos + log_neg.exp() * log_neg).sum(-1).mean()
        total, n = _codebook_sums(u, global_batch)
        p = total / n
        codebook = -(p * torch.log(p + CODEBOOK_LOG_EPS)).sum()
    return per_sample, codebook


@dataclass
class QuantizerOutput:
    """What the quantizer hands to the decoder and to the training loss. Losses are 0-dim tensors."""

    quantized: Tensor            # (B, K, h, w) values +-scale, straight-through gradient to the latent
    indices: Tensor              # (B, h, w) int64 token indices, little-endian over channels
    per_sample_entropy: Tensor   # mean over tokens of each token's code entropy (want low: confident bits)
    codebook_entropy: Tensor     # entropy of the batch-mean code distribution (want high: codebook use)
    commitment: Tensor           # MSE(z, q.detach())
    entropy_loss: Tensor         # w_s * per_sample_entropy - w_c * codebook_entropy (may be negative)


class LFQ(nn.Module):
    """Lookup-free quantizer over the channels of a (B, K, h, w) latent. No learnable parameters."""

    def __init__(
        self,
        bits: int = 18,
        scale: float = 1.0,
        temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        codebook_entropy_weight: float = 1.0,
        global_codebook_entropy: bool = False,
    ):
        super().__init__()
        self.bits = bits
        self.scale = scale
        self.temperature = temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.codebook_entropy_weight = codebook_entropy_weight
        self.global_codebook_entropy = global_codebook_entropy

    def indices(self, z: Tensor) -> Tensor:
        """(B, K, h, w) latent -> (B, h, w) int64 indices, without quantizing anything else."""
        return bits_to_index(z.movedim(1, -1))

    def forward(self, z: Tensor, with_losses: Optional[bool] = None) -> QuantizerOutput:
        """Quantize; the aux losses are computed when ``with_losses`` (default: in training mode), else zeros
        (as the official eval-mode quantizer).

        In the latent's own dtype, as the official quantizer: ``quantized`` and the commitment loss keep it
        (float64 stays float64, bfloat16 stays bfloat16); the entropy terms are computed in float32 or wider
        (``entropy_terms``: the tau = 0.01 probabilities are too sharp for half precision)."""
        if z.dim() != 4 or z.shape[1] != self.bits:
            raise ValueError(f"LFQ expects (B, {self.bits}, h, w) latents, got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            z = z.float()
        with_losses = self.training if with_losses is None else with_losses
        q = sign_quantize(z, self.scale)
        quantized = z + (q - z).detach()
        indices = bits_to_index(q.movedim(1, -1))
        if with_losses:
            h_sample, h_codebook = entropy_terms(
                z.movedim(1, -1), self.temperature, self.scale, self.global_codebook_entropy
            )
            commitment = F.mse_loss(z, q)  # q carries no gradient: MSE(z, q.detach())
            aux = self.sample_entropy_weight * h_sample - self.codebook_entropy_weight * h_codebook
        else:
            h_sample = h_codebook = commitment = aux = z.new_zeros(())
        return QuantizerOutput(quantized, indices, h_sample, h_codebook, commitment, aux)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale}, temperature={self.temperature}"
