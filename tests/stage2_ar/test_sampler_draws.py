"""The sampler's uniforms: drawn in bulk (one call per generator per batch, one copy to the device), the same
stream as one draw per step, so per-image seeds keep giving the same images whatever the batching."""
import pytest
import torch

from stage2_ar import generate as S
from stage2_ar.config import PRESETS
from stage2_ar.model import FactorizedAR


def _model():
    torch.manual_seed(0)
    m = FactorizedAR(PRESETS["ar-tiny"])
    for h in m.heads:
        torch.nn.init.normal_(h.weight, std=0.05)
    return m.eval()


def test_bulk_uniforms_are_the_per_step_stream():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    steps = 37
    got = S.uniforms(3, steps, gens(), torch.device("cpu"))
    per_step = [[1.0 - torch.rand(1, 1, generator=g).item() for _ in range(steps)] for g in gens()]
    assert torch.equal(got, torch.tensor(per_step).T)  # (steps, n): row t is every image's t-th uniform
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    one = S.uniforms(4, steps, g1, torch.device("cpu"))
    assert torch.equal(one, torch.stack([1.0 - torch.rand(4, generator=g2) for _ in range(steps)]))
    assert bool((got > 0).all() and (got <= 1).all())


@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)])
def test_one_generator_call_per_image_and_tokens_equal_single_image_runs(monkeypatch, temps):
    m = _model()
    labels = torch.tensor([1, 4, 7])
    seeds = (100, 101, 102)
    calls = []
    real_rand = torch.rand

    def counting_rand(*a, **k):
        calls.append(a)
        return real_rand(*a, **k)

    monkeypatch.setattr(torch, "rand", counting_rand)
    batch = S.generate(m, labels, cfg_scales=2.0, temperatures=temps,
                       generator=[torch.Generator().manual_seed(s) for s in seeds])
    n_random = sum(t != 0 for t in temps)
    assert len(calls) == 3 and all(a[0] == m.cfg.num_tokens * n_random for a in calls)  # not 3 x 16 x 2
    monkeypatch.setattr(torch, "rand", real_rand)
    for i, s in enumerate(seeds):  # one image, one generator: its own stream gives the same tokens
        alone = S.generate(m, labels[i:i + 1], cfg_scales=2.0, temperatures=temps,
                           generator=torch.Generator().manual_seed(s))
        assert torch.equal(alone[0], batch[i])


def test_draw_with_given_uniforms_is_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]))
    u = torch.tensor([0.05, 0.8])
    assert S.draw(logits, 1.0, 0, 1.0, u=u).tolist() == [0, 2]
    u = torch.tensor([0.31, 0.5])  # cdf rows: [.1, .3, 1] and [.5, .75, 1]; first index whose cdf reaches u
    assert S.draw(logits, 1.0, 0, 1.0, u=u).tolist() == [2, 0]
