"""LFQ computes in the latent's dtype, as the official quantizer does (it used to cast everything to float32):
float64 stays float64, bfloat16 stays bfloat16, and float32 results are those of the float32 computation."""
import pytest
import torch
import torch.nn.functional as F

from shared.tokens import bits_to_index
from stage1_tokenizer.lfq import LFQ, entropy_terms

TAU = 0.01


def _latent(dtype, seed=0, spread=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64) * spread).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_quantized_latent_and_commitment_keep_the_dtype(dtype):
    q = LFQ(bits=6, scale=0.5, temperature=TAU).train()
    z = _latent(dtype).requires_grad_(True)
    out = q(z)
    assert out.quantized.dtype == dtype and out.commitment.dtype == dtype
    signs = torch.where(z.detach() > 0, 0.5, -0.5).to(dtype)
    assert torch.equal(out.quantized.detach(), signs)
    assert torch.equal(out.indices, bits_to_index(z.detach().movedim(1, -1)))
    assert torch.equal(out.commitment, F.mse_loss(z.detach(), signs))
    (grad,) = torch.autograd.grad(out.quantized.sum() + out.entropy_loss, z)
    assert grad.dtype == dtype
    # the entropy terms: float64 in float64, float32 (never half precision: too sharp at tau 0.01) otherwise
    want = torch.promote_types(dtype, torch.float32)
    assert out.per_sample_entropy.dtype == want and out.codebook_entropy.dtype == want
    h_sample, h_codebook = entropy_terms(z.detach().movedim(1, -1), TAU, 0.5)
    assert torch.equal(out.per_sample_entropy.detach(), h_sample) and torch.equal(out.codebook_entropy.detach(),
                                                                                 h_codebook)


def test_float64_is_not_rounded_through_float32():
    z = _latent(torch.float64, spread=1e-9)
    z[0, 0, 0, 0] = 1e-300  # positive in float64, zero (so a -1 bit) once cast to float32
    out = LFQ(bits=6).eval()(z)
    assert out.quantized[0, 0, 0, 0].item() == 1.0 and out.indices[0, 0, 0] % 2 == 1
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0).double())


def test_float32_results_are_unchanged():
    """The float32 path is the computation it always was: sign, straight-through, the same losses."""
    q = LFQ(bits=6, temperature=TAU).train()
    z = _latent(torch.float32, seed=3).requires_grad_(True)
    out = q(z)
    signs = torch.where(z.detach() > 0, 1.0, -1.0)
    assert out.quantized.dtype == torch.float32 and torch.equal(out.quantized.detach(), signs)
    assert torch.equal(out.commitment, F.mse_loss(z, signs))
    h_sample, h_codebook = entropy_terms(z.movedim(1, -1), TAU)
    assert torch.equal(out.entropy_loss, h_sample - h_codebook)
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    assert torch.equal(grad, torch.ones_like(z))  # straight-through
    eval_out = LFQ(bits=6).eval()(z.detach())
    assert eval_out.entropy_loss.dtype == torch.float32 and eval_out.entropy_loss.item() == 0.0
