"""Stage-2 factorized AR transformer: sizes, initial loss, causality, 2D RoPE, KV cache, checkpoints."""
import math

import pytest
import torch

from shared.checkpoint import CheckpointError
from stage2_ar.blocks import Block, KVCache
from stage2_ar.config import PRESETS, with_overrides
from stage2_ar.model import FactorizedAR, count_params, subtoken_loss
from stage2_ar.rope import apply_rope, rope_table
from support.ar_models import ar_batch as _batch
from support.ar_models import ar_model as _model

TINY = PRESETS["ar-tiny"]


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("name,expected", [("ar-B", 343_570_432), ("ar-L", 804_362_240), ("ar-XL", 1_486_679_040)])
def test_official_parameter_counts(name, expected):
    assert count_params(PRESETS[name]) == expected


def test_ffn_hidden_rounding_matches_official():
    # round_up(int(2 * 4 * D / 3), 256): 1024 -> 2730 -> 2816, 1280 -> 3413 -> 3584, 1536 -> 4096 -> 4096
    assert [PRESETS[n].ffn_hidden for n in ("ar-B", "ar-L", "ar-XL")] == [2816, 3584, 4096]


def test_state_dict_shapes_of_B_on_meta():
    with torch.device("meta"):
        m = FactorizedAR(PRESETS["ar-B"])
    sd = m.state_dict()
    assert len(sd) == 188  # same entry count as the official B transformer (rope is not saved)
    assert sd["tok_emb.0.weight"].shape == (64, 1024) and sd["tok_emb.1.weight"].shape == (4096, 1024)
    assert sd["class_emb.weight"].shape == (1001, 1024)
    assert sd["inter.23.attn.wqkv.weight"].shape == (3072, 1024)
    assert sd["intra.1.ffn.w2.weight"].shape == (1024, 2816)
    assert sd["heads.1.weight"].shape == (4096, 1024)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        with_overrides(TINY, dim=66)  # not divisible by 4 heads
    with pytest.raises(ValueError):
        with_overrides(TINY, cfg_scales=(1.0, 2.0, 3.0))


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("bits", [(6, 12), (9, 9), (4, 6, 8)])
def test_fresh_loss_is_sum_of_log_vocab(bits):
    cfg = with_overrides(TINY, bits=bits)
    torch.manual_seed(0)
    m = FactorizedAR(cfg)  # zero-initialised heads: uniform distributions
    subs, labels = _batch(cfg, b=3)
    m.train()  # dropout on: must not matter with zero heads
    loss = m.loss(subs, labels)
    assert loss.item() == pytest.approx(sum(b * math.log(2) for b in bits), abs=1e-5)
    logits = m(subs, labels)
    assert [tuple(l.shape) for l in logits] == [(3, cfg.num_tokens, 1 << b) for b in bits]


def test_loss_matches_brute_force_cross_entropy():
    m = _model()
    subs, labels = _batch(TINY, b=3)
    logits = m(subs, labels)
    manual = 0.0
    for lg, st in zip(logits, subs):
        logp = lg.log_softmax(-1)
        manual += -logp.gather(-1, st[..., None]).mean()
    assert m.loss(subs, labels).item() == pytest.approx(manual.item(), rel=1e-6)
    assert subtoken_loss(logits, subs).item() == pytest.approx(manual.item(), rel=1e-6)


def test_training_reduces_loss_on_a_fixed_batch():
    cfg = with_overrides(TINY, embed_dropout=0.0, resid_dropout=0.0, class_dropout=0.0)
    torch.manual_seed(0)
    m = FactorizedAR(cfg).train()
    subs, labels = _batch(cfg, b=2)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = m.loss(subs, labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


def test_class_dropout_rate_and_eval_determinism():
    m = FactorizedAR(TINY).train()
    labels = torch.zeros(20000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = (m.drop_labels(labels) == TINY.num_classes).float().mean().item()
    assert abs(dropped - 0.1) < 0.01
    m.eval()
    assert torch.equal(m.drop_labels(labels), labels)
    mm = _model()
    subs, lab = _batch(TINY)
    a, b = mm(subs, lab), mm(subs, lab)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("bits", [(6, 12), (4, 6, 8)])
def test_changing_token_t_changes_no_earlier_logit(bits):
    cfg = with_overrides(TINY, bits=bits)
    m = _model(cfg)
    subs, labels = _batch(cfg, b=1)
    base = m(subs, labels)
    for t in (0, 5, cfg.num_tokens - 1):
        changed = tuple(s.clone() for s in subs)
        for s, v in zip(changed, cfg.vocab_sizes):
            s[0, t] = (s[0, t] + 1 + v // 3) % v
        new = m(changed, labels)
        for b_lg, n_lg in zip(base, new):
            assert torch.equal(b_lg[:, :t], n_lg[:, :t]), f"logits before {t} changed"
        # the first sub-token of position t sees only earlier positions
        assert torch.equal(base[0][:, t], new[0][:, t])
        if t + 1 < cfg.num_tokens:
            assert not torch.allclose(base[0][:, t + 1:], new[0][:, t + 1:])


@pytest.mark.parametrize("bits", [(6, 12), (4, 6, 8)])
def test_subtoken_m_affects_only_later_subtokens_of_its_position(bits):
    cfg = with_overrides(TINY, bits=bits)
    m = _model(cfg)
    subs, labels = _batch(cfg, b=1)
    base = m(subs, labels)
    t = 6
    M = len(bits)
    for k in range(M):
        changed = tuple(s.clone() for s in subs)
        v = cfg.vocab_sizes[k]
        changed[k][0, t] = (changed[k][0, t] + 1) % v
        new = m(changed, labels)
        for j in range(M):
            same = torch.equal(base[j][:, t], new[j][:, t])
            assert same == (j <= k), f"sub-token {k} -> logits of sub-token {j} at its position: same={same}"
            assert torch.equal(base[j][:, :t], new[j][:, :t])
            assert not torch.allclose(base[j][:, t + 1:], new[j][:, t + 1:])  # every token feeds later ones


def test_label_changes_every_logit():
    m = _model()
    subs, labels = _batch(TINY, b=1)
    a = m(subs, labels)
    b = m(subs, (labels + 1) % TINY.num_classes)
    # position 0 (sub-token 0) is a function of the class alone
    assert not torch.allclose(a[0][:, 0], b[0][:, 0])


# ---------------------------------------------------------------- 2D RoPE


def test_rope_table_layout():
    h, w, hd = 3, 5, 16
    tab = rope_table((h, w), hd)
    assert tab.shape == (1 + h * w, hd // 2, 2)
    assert torch.equal(tab[0], torch.zeros(hd // 2, 2))           # class slot: q, k zeroed
    assert torch.allclose(tab[1, :, 0], torch.ones(hd // 2))      # grid (0, 0): identity
    assert torch.allclose(tab[1, :, 1], torch.zeros(hd // 2))
    q = hd // 4
    freqs = [10000 ** (-2 * k / (hd // 2)) for k in range(q)]
    for r in range(h):
        for c in range(w):
            row = tab[1 + r * w + c]
            want = torch.tensor([r * f for f in freqs] + [c * f for f in freqs])
            assert torch.allclose(row[:, 0], want.cos(), atol=1e-6)
            assert torch.allclose(row[:, 1], want.sin(), atol=1e-6)
    ident = rope_table((h, w), hd, zero_cls=False)[0]
    assert torch.equal(ident[:, 0], torch.ones(hd // 2)) and torch.equal(ident[:, 1], torch.zeros(hd // 2))


def test_apply_rope_rotates_adjacent_pairs_and_is_relative():
    torch.manual_seed(0)
    h, w, hd = 4, 4, 16
    tab = rope_table((h, w), hd)
    x = torch.randn(1, 1, 1, hd)
    # brute force: pair i = (x[2i], x[2i+1]) multiplied by the complex number cos + i sin
    pos = 1 + 2 * w + 3
    out = apply_rope(x, tab[pos:pos + 1])[0, 0, 0]
    xc = torch.complex(x[0, 0, 0, 0::2], x[0, 0, 0, 1::2]) * torch.complex(tab[pos, :, 0], tab[pos, :, 1])
    assert torch.allclose(out[0::2], xc.real, atol=1e-6) and torch.allclose(out[1::2], xc.imag, atol=1e-6)
    assert torch.equal(apply_rope(x, tab[0:1]), torch.zeros_like(x))  # the class slot
    # q.k after rotation depends on the 2D offset only
    q, k = torch.randn(hd), torch.randn(hd)

    def dot(pq, pk):
        a = apply_rope(q.view(1, 1, 1, hd), tab[1 + pq[0] * w + pq[1]][None])
        b = apply_rope(k.view(1, 1, 1, hd), tab[1 + pk[0] * w + pk[1]][None])
        return (a * b).sum().item()

    assert dot((2, 3), (1, 1)) == pytest.approx(dot((1, 2), (0, 0)), abs=1e-5)
    assert dot((2, 3), (1, 1)) != pytest.approx(dot((2, 2), (1, 1)), abs=1e-3)


def test_class_slot_query_and_key_are_zeroed():
    """With the official zero rotation, the class slot's attention logits are 0 whatever the weights."""
    m = _model()
    blk = m.inter[0]
    x = torch.randn(1, 3, TINY.dim)
    captured = {}

    def hook(mod, args, out):
        captured["qkv"] = out

    hnd = blk.attn.wqkv.register_forward_hook(hook)
    blk(x, m.rope[:3])
    hnd.remove()
    qkv = captured["qkv"].view(1, 3, 3, TINY.n_head, TINY.head_dim).permute(2, 0, 3, 1, 4)
    q = apply_rope(qkv[0], m.rope[:3])
    assert torch.equal(q[:, :, 0], torch.zeros_like(q[:, :, 0]))
    assert q[:, :, 1:].abs().sum() > 0


# ---------------------------------------------------------------- KV cache and precision


def test_block_with_cache_equals_full_causal_forward():
    torch.manual_seed(0)
    blk = Block(32, 4, 64, 1e-5, 0.0).eval()
    tab = rope_table((3, 3), 8)
    x = torch.randn(2, 10, 32)
    full = blk(x, tab)
    cache = KVCache(1, 10)
    pieces, start = [], 0
    for n in (1, 3, 1, 5):  # mixed chunk sizes exercise the prefix+causal mask
        pieces.append(blk(x[:, start:start + n], tab[start:start + n], cache.layer(0), start))
        start += n
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    with pytest.raises(ValueError):
        blk(x[:, :1], tab[:1], cache.layer(0), 10)


def test_bf16_autocast_forward_runs_and_is_close():
    m = _model()
    subs, labels = _batch(TINY)
    ref = m.loss(subs, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m.loss(subs, labels)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    cfg = with_overrides(TINY, bits=(9, 9), cfg_scales=(1.5, 2.5))
    m = _model(cfg)
    m.save(tmp_path / "ar", extra={"step": 7})
    back = FactorizedAR.from_checkpoint(tmp_path / "ar")
    assert back.cfg == cfg
    subs, labels = _batch(cfg)
    assert all(torch.equal(a, b) for a, b in zip(m(subs, labels), back(subs, labels)))


@pytest.mark.parametrize("overrides", [{}, {"rope_zero_cls": False}, {"bits": (9, 9)}])
def test_empty_model_builds_no_weights_but_the_rope_table(overrides):
    """``FactorizedAR.empty`` (what loading uses): a strict load of the weights gives the same model, RoPE included,
    and the table is still recomputed after a dtype cast."""
    from shared.checkpoint import load_strict

    cfg = with_overrides(TINY, **overrides)
    m = _model(cfg)
    empty = FactorizedAR.empty(cfg)
    assert torch.equal(empty.rope, m.rope) and "rope" not in empty.state_dict()
    load_strict(empty, m.state_dict(), source="test")
    subs, labels = _batch(cfg)
    assert all(torch.equal(a, b) for a, b in zip(m.eval()(subs, labels), empty.eval()(subs, labels)))
    assert torch.equal(empty.to(torch.bfloat16).rope, m.rope)


def test_checkpoint_kind_and_shape_mismatch(tmp_path):
    from shared.checkpoint import save_checkpoint
    from shared.config import to_dict

    m = _model()
    save_checkpoint(tmp_path / "tok", m.state_dict(), to_dict(TINY), kind="tokenizer")
    with pytest.raises(CheckpointError, match="expected 'ar'"):
        FactorizedAR.from_checkpoint(tmp_path / "tok")
    sd = m.state_dict()
    sd.pop("norm.weight")
    save_checkpoint(tmp_path / "bad", sd, to_dict(TINY), kind="ar")
    with pytest.raises(CheckpointError, match="missing"):
        FactorizedAR.from_checkpoint(tmp_path / "bad")


@pytest.mark.big
def test_ar_B_fresh_loss_and_param_count_materialised():
    torch.manual_seed(0)
    m = FactorizedAR(PRESETS["ar-B"]).eval()
    assert sum(p.numel() for p in m.parameters()) == 343_570_432
    subs, labels = _batch(PRESETS["ar-B"], b=1)
    with torch.no_grad():
        loss = m.loss(subs, labels)
    assert loss.item() == pytest.approx(math.log(64) + math.log(4096), abs=1e-5)
