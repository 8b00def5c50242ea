"""The two model options the ablations add: a plain-GroupNorm tokenizer decoder and AR independent heads
(n_intra = 0). The defaults stay the official models (their counts and keys are pinned elsewhere)."""
from dataclasses import replace

import pytest
import torch

from stage1_tokenizer.config import PRESETS as TOK_PRESETS
from stage1_tokenizer.model import count_parameters
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_ar.config import PRESETS as AR_PRESETS
from stage2_ar.config import with_overrides
from stage2_ar.generate import generate
from stage2_ar.model import FactorizedAR, count_params
from support.ar_models import ar_batch as _batch  # the AR model tests' helpers: random sub-tokens, heads with weights
from support.ar_models import ar_model as _ar

TOK_TINY = TOK_PRESETS["tokenizer-tiny"]
AR_TINY = AR_PRESETS["ar-tiny"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------- tokenizer: decoder_norm="groupnorm"


def test_default_decoder_norm_is_adaptive_and_groupnorm_swaps_only_the_level_norms():
    assert TOK_TINY.decoder_norm == "adagn"
    ada = Tokenizer(TOK_TINY)
    gn = Tokenizer(replace(TOK_TINY, decoder_norm="groupnorm"))
    ada_keys, gn_keys = set(ada.state_dict()), set(gn.state_dict())
    assert ada_keys - gn_keys == {k for k in ada_keys if ".adanorm." in k} and ada_keys - gn_keys
    assert gn_keys - ada_keys == {k for k in gn_keys if k.startswith("decoder.levels.") and ".norm." in k}
    # each level: AdaGN's two Linear(z, C) layers become one affine GroupNorm(C)
    z, diff = TOK_TINY.z_channels, 0
    for level in ada.decoder.levels:
        c = level.adanorm.to_scale.out_features
        diff += 2 * (z * c + c) - 2 * c
    assert count_parameters(ada) - count_parameters(gn) == diff
    assert count_parameters(ada.encoder) == count_parameters(gn.encoder)


def test_groupnorm_decoder_ignores_the_latent_statistics_that_adagn_reads():
    torch.manual_seed(0)
    gn = Tokenizer(replace(TOK_TINY, decoder_norm="groupnorm")).eval()
    ada = Tokenizer(TOK_TINY).eval()
    zq = torch.where(torch.rand(2, TOK_TINY.z_channels, 4, 4) > 0.5, 1.0, -1.0)
    x = torch.randn(2, gn.decoder.levels[-1].norm.num_channels, 4, 4)
    flipped = zq.clone()
    flipped[:, 0] = -flipped[:, 0]  # other latent statistics, same activations entering the norm
    level_gn, level_ada = gn.decoder.levels[-1], ada.decoder.levels[-1]
    assert torch.equal(level_gn(x, zq), level_gn(x, flipped))
    assert not torch.allclose(level_ada(x, zq), level_ada(x, flipped))
    # and the whole decoder still depends on the latent (through its input conv)
    assert not torch.allclose(gn.decode_latent(zq), gn.decode_latent(flipped))


def test_groupnorm_tokenizer_trains_round_trips_and_refuses_adagn_weights(tmp_path):
    from shared.checkpoint import CheckpointError, load_state_dict, load_strict

    cfg = replace(TOK_TINY, decoder_norm="groupnorm")
    torch.manual_seed(0)
    tok = Tokenizer(cfg).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, q = tok(x)
    loss = (rec - x).abs().mean() + q.entropy_loss
    loss.backward()
    assert all(p.grad is not None for p in tok.decoder.parameters())
    tok.eval()
    tok.save(tmp_path / "gn")
    back = Tokenizer.from_checkpoint(tmp_path / "gn")
    assert back.cfg.decoder_norm == "groupnorm"
    assert torch.equal(back.reconstruct(x), tok.reconstruct(x))
    Tokenizer(TOK_TINY).save(tmp_path / "ada")
    with pytest.raises(CheckpointError):
        load_strict(back, load_state_dict(tmp_path / "ada"), source="ada")


def test_unknown_decoder_norm_is_rejected():
    with pytest.raises(ValueError, match="decoder_norm"):
        replace(TOK_TINY, decoder_norm="batchnorm").validate()


# ---------------------------------------------------------------- AR: n_intra = 0 (independent heads)


INDEP = with_overrides(AR_TINY, n_intra=0)


def test_independent_heads_have_no_intra_blocks_and_equal_params_with_two_more_inter_blocks():
    assert AR_TINY.n_intra == 1 and not FactorizedAR(AR_TINY).independent_heads
    m = FactorizedAR(INDEP)
    assert m.independent_heads and len(m.intra) == 0
    assert not any(k.startswith("intra.") for k in m.state_dict())
    # the ablation's parameter matching: L intra blocks are worth L inter blocks exactly
    two = with_overrides(AR_TINY, n_inter=2, n_intra=2)
    assert count_params(two) == count_params(with_overrides(AR_TINY, n_inter=4, n_intra=0))
    with pytest.raises(ValueError):
        with_overrides(AR_TINY, n_intra=-1)
    with pytest.raises(ValueError):
        with_overrides(AR_TINY, n_inter=0)


def _bumped(m, subs, labels, k, t):
    """Logits after adding 1 to sub-token k at position t (batch of one)."""
    changed = [s.clone() for s in subs]
    changed[k][0, t] = (changed[k][0, t] + 1) % m.cfg.vocab_sizes[k]
    return m(tuple(changed), labels)


@pytest.mark.parametrize("bits", [(6, 12), (4, 6, 8)])
def test_independent_heads_are_causal_over_positions_and_blind_to_their_own_subtokens(bits):
    m = _ar(with_overrides(INDEP, bits=bits))
    subs, labels = _batch(m.cfg, b=1)
    base, t = m(subs, labels), 6
    for k in range(len(bits)):
        for before, after in zip(base, _bumped(m, subs, labels, k, t)):
            # no head at position t (or earlier) sees any sub-token of t, and every later position does
            assert torch.equal(before[:, : t + 1], after[:, : t + 1])
            assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


def test_independent_heads_all_read_the_same_normed_inter_output():
    m = _ar(INDEP)
    subs, labels = _batch(INDEP)
    logits = m(subs, labels)
    tok = m.embed(subs)
    x = torch.cat([m.class_emb(labels)[:, None], tok[:, :-1]], 1)
    y = m.norm(m.run_inter(x))
    for head, lg in zip(m.heads, logits):
        assert torch.allclose(head(y), lg, atol=1e-6)


@pytest.mark.parametrize("bits,scales", [((6, 12), 1.0), ((6, 12), (1.9, 2.0)), ((9, 9), 3.0)])
def test_independent_heads_sampler_logits_equal_teacher_forcing(bits, scales):
    cfg = with_overrides(INDEP, bits=bits)
    m = _ar(cfg)
    labels = torch.tensor([0, 4, 9])
    idx, logits = generate(m, labels, cfg_scales=scales, generator=torch.Generator().manual_seed(1),
                           return_logits=True)
    ref = m(m.split(idx.flatten(1)), labels)
    for a, b in zip(logits, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5
    again = generate(m, labels, cfg_scales=scales, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(idx, again)


def test_independent_heads_checkpoint_round_trip(tmp_path):
    m = _ar(INDEP)
    m.save(tmp_path / "ar")
    back = FactorizedAR.from_checkpoint(tmp_path / "ar")
    assert back.cfg.n_intra == 0
    subs, labels = _batch(INDEP)
    for a, b in zip(m(subs, labels), back(subs, labels)):
        assert torch.equal(a, b)
