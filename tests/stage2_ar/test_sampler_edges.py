"""The sampler at its edges, against the official sampler's rules written out independently here.

* top-p: the official filter (``top_k_top_p_filtering``) drops a token when the cumulative mass of the tokens
  sorted before it is over top_p; the token that crosses top_p stays, and so does one whose preceding mass is
  exactly top_p.
* CFG: the official sampler guides a sub-token only where its scale is > 1; a scale <= 1 means the plain
  conditional logits. A scale of exactly 1.0 next to a guided sub-token crashes it (its caches are sized for
  guidance at >= 1, its batch doubled only at > 1): here that is a one-line error.
* top-k / top-p / temperature are per sub-token, on the CLI too (``--top-k 0,5``), down to every draw.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from stage2_ar import generate as G
from stage2_ar import sample
from stage2_ar.config import PRESETS
from stage2_ar.model import FactorizedAR

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(head_std=0.3):
    torch.manual_seed(0)
    m = FactorizedAR(PRESETS["ar-tiny"])
    for h in m.heads:
        torch.nn.init.normal_(h.weight, std=head_std)
    return m.eval()


# ---------------------------------------------------------------------------------------------- top-k / top-p


def official_keep(row: torch.Tensor, top_k: int, top_p: float):
    """Which tokens of one row of logits the official filter keeps, one token at a time: top-k drops what is
    below the k-th largest logit; top-p walks the tokens from the most likely, adding up their float32 softmax
    mass, and drops a token once the mass of the tokens before it is over top_p. The running mass is what
    torch's CPU cumsum gives (summed in double, stored as float32), compared in float32 (as torch compares a
    float32 tensor with a Python float)."""
    vals = row.tolist()
    v = len(vals)
    if top_k > 0:
        kth = sorted(vals, reverse=True)[min(max(top_k, 1), v) - 1]
        vals = [x if x >= kth else -math.inf for x in vals]
    keep = [x > -math.inf for x in vals]
    if top_p < 1.0:
        order = sorted(range(v), key=lambda i: -vals[i])
        probs = torch.tensor([vals[i] for i in order], dtype=torch.float32).softmax(0).numpy()
        limit, total = np.float32(top_p), 0.0
        for rank, i in enumerate(order):
            if rank > 0 and np.float32(total) > limit:
                keep[i] = False
            total += float(probs[rank])
    return keep


def test_filter_logits_follows_the_official_rule_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 11, generator=g) * 2.0
    for row in logits:
        sorted_probs = row.sort(descending=True).values.softmax(0)
        cums = sorted_probs.cumsum(0).tolist()  # exact ties: a top_p equal to a cumulative mass
        for top_p in [0.05, 0.3, 0.5, 0.9, 0.999, 1.0] + cums[:4]:
            for top_k in (0, 1, 3, 11, 20):
                got = (G.filter_logits(row[None], top_k, top_p) > -math.inf).squeeze(0).tolist()
                assert got == official_keep(row, top_k, top_p), (top_k, top_p)


def test_a_token_whose_preceding_mass_equals_top_p_is_kept():
    # four equal logits: every probability is exactly 0.25 and the cumulative masses 0.25, 0.5, 0.75, 1
    logits = torch.zeros(1, 4)
    kept = lambda p: int((G.filter_logits(logits, 0, p) > -math.inf).sum())
    assert [kept(p) for p in (0.25, 0.5, 0.75)] == [2, 3, 4]  # the token after the exact mass stays too
    assert [kept(p) for p in (0.2499, 0.4999, 0.7499)] == [1, 2, 3]
    # and in a draw: the kept tokens carry the whole mass, renormalised
    u = torch.linspace(0.01, 1.0, 400)
    picks = G.draw(logits.expand(400, 4), 1.0, 0, 0.5, u=u)
    assert picks.unique().numel() == 3


# ---------------------------------------------------------------------------------------------- CFG


@pytest.mark.parametrize("scales", [0.99, 0.5, 0.0, (0.5, 0.99), (1.0, 0.25)])
def test_scales_up_to_one_are_unguided_conditional_sampling(scales):
    m = _model()
    labels = torch.tensor([0, 3, 7, 7])
    batches = []
    hook = m.class_emb.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    try:
        got = G.generate(m, labels, cfg_scales=scales, temperatures=0.0)
    finally:
        hook.remove()
    assert batches == [4]  # no doubled batch: the null class is never run
    conditional = G.generate(m, labels, cfg_scales=1.0, temperatures=0.0)
    assert torch.equal(got, conditional)
    unguided = G.generate(m, labels, cfg_scales=2.0, temperatures=0.0, guidance=False)
    assert torch.equal(got, unguided)
    assert not torch.equal(got, G.generate(m, labels, cfg_scales=4.0, temperatures=0.0))  # guidance matters


def test_guidance_applies_only_to_the_sub_tokens_above_one():
    """(2.5, 0.5): the first sub-token guided, the second the conditional argmax (teacher-forced check)."""
    m = _model()
    labels = torch.tensor([2, 5, 8])
    idx = G.generate(m, labels, cfg_scales=(2.5, 0.5), temperatures=0.0)
    subs = m.split(idx.flatten(1))
    cond = m(subs, labels)
    uncond = m(subs, torch.full_like(labels, m.null_class))
    assert torch.equal((uncond[0] + 2.5 * (cond[0] - uncond[0])).argmax(-1), subs[0])
    assert torch.equal(cond[1].argmax(-1), subs[1])


@pytest.mark.parametrize("scales", [(2.0, 1.0), (1.0, 2.0), (1.0, 1.5)])
def test_exactly_one_next_to_a_guided_scale_is_refused(scales):
    m = _model()
    with pytest.raises(ValueError, match=r"exactly 1\.0 next to a guided sub-token") as e:
        G.generate(m, torch.tensor([1]), cfg_scales=scales)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"exactly 1\.0"):
        G.check_sampling(cfg_scales=scales)
    for fine in (1.0, (1.0, 1.0), (1.0, 0.5), (2.0, 0.999), (1.001, 2.0)):
        G.check_sampling(cfg_scales=fine)


def test_the_cli_refuses_the_exact_one_before_loading_anything(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("bad input must be refused before any model is loaded")

    monkeypatch.setattr(FactorizedAR, "from_checkpoint", refuse)
    _model().save(tmp_path / "ar")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "ar"), "--classes", "0", "--cfg", "1.9,1", "--out", str(tmp_path / "o")])
    msg = str(e.value.code)
    assert msg.startswith("error: cfg_scales (1.9, 1.0): a scale of exactly 1.0") and "\n" not in msg
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- per sub-token


def _record_draws(monkeypatch):
    calls = []
    real = G.draw

    def recording(logits, temperature, top_k, top_p, generator=None, u=None):
        calls.append((logits.shape[-1], temperature, top_k, top_p))
        return real(logits, temperature, top_k, top_p, generator, u)

    monkeypatch.setattr(G, "draw", recording)
    return calls


def test_per_sub_token_settings_reach_every_draw(monkeypatch):
    m = _model()
    calls = _record_draws(monkeypatch)
    G.generate(m, torch.tensor([1, 2]), temperatures=(1.0, 0.8), top_k=(0, 5), top_p=(1.0, 0.9),
               generator=torch.Generator().manual_seed(0))
    vocab = [2 ** b for b in m.cfg.bits]
    assert sorted(set(calls)) == sorted({(vocab[0], 1.0, 0, 1.0), (vocab[1], 0.8, 5, 0.9)})
    assert len(calls) == 2 * m.cfg.num_tokens


def test_cli_takes_one_value_per_sub_token_or_one_for_all(tmp_path, monkeypatch, tiny_tokenizer_ckpt):
    m = _model()
    m.save(tmp_path / "ar")
    vocab = [2 ** b for b in m.cfg.bits]
    base = ["--ckpt", str(tmp_path / "ar"), "--tokenizer", str(tiny_tokenizer_ckpt), "--classes", "0,1", "--per-class",
            "1"]
    calls = _record_draws(monkeypatch)
    assert sample.main(base + ["--top-k", "0,5", "--top-p", "1.0,0.9", "--temperature", "1.0,0.8", "--cfg", "2,3",
                               "--out", str(tmp_path / "a")]) == 0
    assert set(calls) == {(vocab[0], 1.0, 0, 1.0), (vocab[1], 0.8, 5, 0.9)}
    calls.clear()
    assert sample.main(base + ["--top-k", "3", "--top-p", "0.95", "--temperature", "0.7", "--out",
                               str(tmp_path / "b")]) == 0
    assert set(calls) == {(vocab[0], 0.7, 3, 0.95), (vocab[1], 0.7, 3, 0.95)}
    # the grid records the settings it was drawn with, per sub-token
    rec = json.loads(Image.open(tmp_path / "a" / "grid.png").text[sample.PROVENANCE_KEY])
    assert (rec["top_k"], rec["top_p"], rec["temperatures"], rec["cfg_scales"]) == ([0, 5], [1.0, 0.9], [1.0, 0.8],
                                                                                    [2.0, 3.0])
    for flags, msg in ((["--top-k", "1,2,3"], r"--top-k needs 1 or 2 values"),
                       (["--top-p", "0.9,0.8,0.7"], r"--top-p needs 1 or 2 values"),
                       (["--top-k", "0,2.5"], r"top_k must be an integer >= 0 \(0 = off\), got 2\.5"),
                       (["--top-p", "1,0"], r"top_p must lie in \(0, 1\]"),
                       (["--top-k", "a"], r"--top-k takes comma-separated numbers")):
        with pytest.raises(SystemExit, match="error: " + msg):
            sample.main(base + flags + ["--out", str(tmp_path / "c")])
