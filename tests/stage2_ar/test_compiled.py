"""torch.compile (inductor, which runs on CPU too) against eager: AR training loss and gradients, the static
graph-capturable sampler's tokens and logits, and the tokenizer's compiled encoder/decoder.

Tolerances: inductor fuses and reorders float32 sums, so values agree to float32 round-off, not bitwise:
loss within 1e-5 (absolute), each gradient within 1e-4 of its largest entry, logits within 1e-4; sampled
tokens identical (the tiny models' greedy margins are far above that).
"""
import copy

import pytest
import torch

from stage2_ar.config import PRESETS as AR_PRESETS
from stage2_ar.config import with_overrides
from stage2_ar.generate import generate
from stage2_ar.model import FactorizedAR
from stage2_ar.parallelize import compile_blocks

pytestmark = pytest.mark.slow


def _ar(**kw):
    torch.manual_seed(0)
    m = FactorizedAR(with_overrides(AR_PRESETS["ar-tiny"], **kw))
    for h in m.heads:
        torch.nn.init.normal_(h.weight, std=0.05)
    return m


def test_compiled_ar_blocks_give_eager_loss_and_gradients():
    # dropout off: inductor draws its masks from its own random stream, so masks could not match
    eager = _ar(class_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0).train()
    compiled = compile_blocks(copy.deepcopy(eager))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: same keys
    g = torch.Generator().manual_seed(1)
    subs = [torch.randint(0, v, (4, 16), generator=g) for v in eager.cfg.vocab_sizes]
    labels = torch.randint(0, 10, (4,), generator=g)
    losses = []
    for m in (eager, compiled):
        loss = m.loss(subs, labels)
        loss.backward()
        losses.append(loss.detach())
    assert abs(losses[0] - losses[1]) <= 1e-5, losses
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max().clamp_min(1e-12), name


def test_static_compiled_sampler_matches_the_eager_kv_cache():
    m = _ar().eval()
    labels = torch.tensor([1, 4, 7])
    gens = lambda: [torch.Generator().manual_seed(50 + i) for i in range(3)]
    ref, ref_logits = generate(m, labels, cfg_scales=2.0, generator=gens(), return_logits=True)
    greedy = generate(m, labels, cfg_scales=2.0, top_k=1, generator=gens())
    for compile_mode in (None, "default"):
        out, logits = generate(m, labels, cfg_scales=2.0, generator=gens(), return_logits=True, static=True,
                               compile=compile_mode)
        assert torch.equal(out, ref), compile_mode  # same seeds, same tokens
        for a, b in zip(logits, ref_logits):
            assert (a - b).abs().max() <= 1e-4
        again = generate(m, labels, cfg_scales=2.0, top_k=1, generator=gens(), static=True, compile=compile_mode)
        assert torch.equal(again, greedy)  # greedy: identical tokens; the second call reuses the graphs
    with pytest.raises(ValueError, match="static"):
        generate(m, labels, compile="default")


def test_compiled_tokenizer_encoder_decoder_match_eager():
    from stage1_tokenizer.config import PRESETS as TOK_PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    torch.manual_seed(0)
    eager = Tokenizer(TOK_PRESETS["tokenizer-tiny"]).eval()
    compiled = copy.deepcopy(eager)
    compiled.encoder.compile()
    compiled.decoder.compile()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        za, zb = eager.encode_latent(x), compiled.encode_latent(x)
        assert (za - zb).abs().max() <= 1e-4
        q = eager.quantize(za, with_losses=False)
        assert (eager.decoder(q.quantized) - compiled.decoder(q.quantized)).abs().max() <= 1e-4
