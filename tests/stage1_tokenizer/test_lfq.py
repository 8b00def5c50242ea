"""LFQ: quantization, bit order, and the exact entropy terms against a brute-force full softmax over 2^K codes."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from shared.tokens import bits_to_index, index_to_bits
from stage1_tokenizer import lfq as lfq_module
from stage1_tokenizer.lfq import LFQ, codebook_distribution, entropy_terms, sign_quantize
from support.free_port import free_port

TAU = 0.01


def brute_force(z: torch.Tensor, tau: float = TAU, scale: float = 1.0):
    """The official definition, materialising all N x 2^K probabilities (float64 reference)."""
    k = z.shape[-1]
    codes = index_to_bits(torch.arange(2 ** k), k, signed=True, dtype=z.dtype) * scale  # (2^K, K), index order
    logp = torch.log_softmax(2 * z.reshape(-1, k) @ codes.T / tau, dim=-1)
    p = logp.exp()
    per_sample = -(p * logp).sum(-1).mean()
    p_bar = p.mean(0)
    codebook = -(p_bar * torch.log(p_bar + 1e-5)).sum()
    return per_sample, codebook, p_bar


def _latents(n, k, seed, spread=0.01, dtype=torch.float64):
    # spread ~ tau keeps the bits soft, so both terms and their gradients are far from trivial
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=dtype) * spread).requires_grad_()


@pytest.mark.parametrize("k, chunk", [(4, 512), (8, 512), (10, 512), (12, 512), (5, 7), (12, 7)])
def test_entropy_terms_match_brute_force_values_and_gradients(k, chunk, monkeypatch):
    # chunk 7 < 96 tokens: the chunked forward sum and the recomputing backward walk over several chunks
    monkeypatch.setattr(lfq_module, "CHUNK_TOKENS", chunk)
    z = _latents(96, k, seed=k)
    ref_s, ref_c, _ = brute_force(z)
    ours_s, ours_c = entropy_terms(z, TAU)
    assert torch.allclose(ours_s, ref_s, rtol=1e-6, atol=0)
    assert torch.allclose(ours_c, ref_c, rtol=1e-6, atol=0)
    for ours, ref in ((ours_s, ref_s), (ours_c, ref_c)):
        g_ours, = torch.autograd.grad(ours, z, retain_graph=True)
        g_ref, = torch.autograd.grad(ref, z, retain_graph=True)
        assert g_ref.abs().max() > 1e-3  # a real gradient, not an all-zero comparison
        assert (g_ours - g_ref).abs().max() <= 1e-6 * g_ref.abs().max()


@pytest.mark.parametrize("k", [1, 5, 9])
def test_codebook_distribution_is_exact_in_index_order(k):
    z = _latents(40, k, seed=100 + k, spread=0.02)
    _, _, ref = brute_force(z)
    ours = codebook_distribution(z, TAU)
    assert ours.shape == (2 ** k,)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ours.sum(), torch.ones((), dtype=ours.dtype))


def test_codebook_scale_enters_the_softmax():
    z = _latents(32, 6, seed=7)
    ref_s, ref_c, _ = brute_force(z, scale=0.5)
    ours_s, ours_c = entropy_terms(z, TAU, scale=0.5)
    assert torch.allclose(ours_s, ref_s, rtol=1e-9) and torch.allclose(ours_c, ref_c, rtol=1e-9)


def test_entropy_of_saturated_bits_is_finite_fp32_and_bf16():
    # |z| ~ 1 at tau = 0.01 puts 4z/tau ~ 400: sigmoid saturates, naive log(p) would be -inf.
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 18, 8, 8, generator=g) * 3).requires_grad_()
    z.data[0, :, 0, 0] = 0.0  # exact zeros too
    lfq = LFQ(bits=18).train()
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = lfq(z.to(torch.bfloat16) if bf16 else z)  # under autocast the encoder hands over bf16
            loss = out.entropy_loss + out.commitment
        grad, = torch.autograd.grad(loss, z)
        for t in (out.per_sample_entropy, out.codebook_entropy, out.commitment, out.entropy_loss, grad):
            assert torch.isfinite(t).all()
        assert out.per_sample_entropy.dtype == torch.float32
        # 255 saturated tokens (entropy ~0) and one all-zero token (18 fair bits: 18 ln 2 nats), so the mean
        # per-token entropy is just above 18 ln 2 / 256; the batch mean spreads over ~256 modes plus that token.
        floor = 18 * math.log(2) / 256
        assert floor - 1e-4 < out.per_sample_entropy < floor + 0.1
        assert math.log(255) < out.codebook_entropy <= math.log(256) + floor + 1e-3


def test_quantize_sign_zero_and_straight_through():
    z = torch.tensor([[-2.0, -0.0, 0.0, 1e-8, 3.0]])
    assert sign_quantize(z).tolist() == [[-1.0, -1.0, -1.0, 1.0, 1.0]]
    assert sign_quantize(z, 0.5).tolist() == [[-0.5, -0.5, -0.5, 0.5, 0.5]]
    lfq = LFQ(bits=3, scale=1.0).eval()
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = lfq(x)
    assert set(out.quantized.unique().tolist()) <= {-1.0, 1.0}
    (out.quantized * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    assert torch.equal(x.grad, torch.arange(3.0).view(1, 3, 1, 1).expand_as(x))  # identity gradient


def test_indices_follow_the_shared_codec_little_endian():
    lfq = LFQ(bits=18)
    z = torch.randn(2, 18, 3, 4)
    out = lfq(z)
    assert out.indices.shape == (2, 3, 4) and out.indices.dtype == torch.int64
    expected = sum(((z[:, c] > 0).long() << c) for c in range(18))  # channel c is bit c
    assert torch.equal(out.indices, expected)
    assert torch.equal(out.indices, bits_to_index(z.movedim(1, -1)))
    back = index_to_bits(out.indices, 18).movedim(-1, 1)
    assert torch.equal(back, out.quantized.detach())


def test_losses_in_training_mode_and_zeros_in_eval():
    torch.manual_seed(0)
    z = torch.randn(2, 10, 4, 4) * 0.02
    lfq = LFQ(bits=10, sample_entropy_weight=1.0, codebook_entropy_weight=0.5)
    out = lfq.train()(z)
    s, c = entropy_terms(z.movedim(1, -1), TAU)
    assert torch.allclose(out.per_sample_entropy, s) and torch.allclose(out.codebook_entropy, c)
    assert torch.allclose(out.entropy_loss, s - 0.5 * c)
    assert torch.allclose(out.commitment, ((z - sign_quantize(z)) ** 2).mean())
    ev = lfq.eval()(z)
    assert ev.entropy_loss == 0 and ev.commitment == 0 and torch.equal(ev.indices, out.indices)
    assert lfq.eval()(z, with_losses=True).commitment > 0


def test_commitment_gradient_reaches_only_the_latent():
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    out = LFQ(bits=4).train()(z)
    g, = torch.autograd.grad(out.commitment, z)
    q = sign_quantize(z.detach())
    assert torch.allclose(g, 2 * (z.detach() - q) / z.numel())


def test_bad_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="expects"):
        LFQ(bits=18)(torch.randn(1, 17, 2, 2))


# --- global codebook entropy across ranks: 2 gloo processes vs one process holding the whole batch ----------

def _rank_worker(rank, world, port, z_all, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z = z_all.chunk(world)[rank].clone().requires_grad_()
        _, h_global = entropy_terms(z, TAU, global_batch=True)
        _, h_local = entropy_terms(z, TAU, global_batch=False)
        grad, = torch.autograd.grad(h_global, z)
        grad = grad / world  # what DDP's gradient averaging does to every rank's gradient
        queue.put((rank, h_global.item(), h_local.item(), grad))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_codebook_entropy_over_ranks_equals_single_process():
    torch.manual_seed(3)
    z_all = (torch.randn(24, 8, dtype=torch.float64) * 0.01)
    ref = z_all.clone().requires_grad_()
    _, h_ref = entropy_terms(ref, TAU)
    g_ref, = torch.autograd.grad(h_ref, ref)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, z_all, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    grads = torch.cat([r[3] for r in results])
    for _, h_global, h_local, _ in results:
        assert abs(h_global - h_ref.item()) < 1e-9 * abs(h_ref.item())
        assert abs(h_local - h_ref.item()) > 1e-3  # the local term really differs
    assert torch.allclose(grads, g_ref, rtol=1e-8, atol=1e-12)
