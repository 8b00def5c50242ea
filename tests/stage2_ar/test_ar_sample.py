"""Stage-2 sampler: KV-cache logits vs teacher forcing, CFG, seeds, top-k/top-p, the draw, and the CLI."""
import numpy as np
import pytest
import torch

from stage2_ar.config import PRESETS, with_overrides
from stage2_ar.model import FactorizedAR
from stage2_ar.generate import draw, filter_logits, generate
from stage2_ar.sample import main

TINY = PRESETS["ar-tiny"]


def _model(cfg=TINY, seed=0, head_std=0.05):
    torch.manual_seed(seed)
    m = FactorizedAR(cfg)
    for h in m.heads:
        torch.nn.init.normal_(h.weight, std=head_std)
    return m.eval()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits,scales", [((6, 12), 1.0), ((6, 12), (1.9, 2.0)), ((4, 6, 8), 3.0)])
def test_cached_logits_equal_teacher_forced_forward(bits, scales):
    cfg = with_overrides(TINY, bits=bits)
    m = _model(cfg)
    labels = torch.tensor([0, 4, 9])
    idx, logits = generate(m, labels, cfg_scales=scales, generator=_gen(1), return_logits=True)
    assert idx.shape == (3, *cfg.grid) and idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < 2 ** sum(bits)
    ref = m(m.split(idx.flatten(1)), labels)
    for a, b in zip(logits, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5


def test_cache_and_full_prefix_recompute_sample_the_same_tokens():
    m = _model()
    labels = torch.tensor([1, 2])
    a = generate(m, labels, cfg_scales=2.0, generator=_gen(3))
    b = generate(m, labels, cfg_scales=2.0, generator=_gen(3), use_cache=False)
    assert torch.equal(a, b)


def test_cfg_scale_one_equals_conditional_sampling():
    m = _model()
    labels = torch.tensor([0, 3, 7, 7])
    cond = generate(m, labels, cfg_scales=1.0, generator=_gen(5))                  # no doubled batch
    guided = generate(m, labels, cfg_scales=1.0, guidance=True, generator=_gen(5))  # doubled, u + 1*(c-u)
    strong = generate(m, labels, cfg_scales=4.0, generator=_gen(5))
    assert torch.equal(cond, guided)
    assert not torch.equal(cond, strong)


def test_cfg_mixes_conditional_and_null_logits():
    """Greedy guided sampling picks argmax of u + s (c - u), with c, u from teacher-forced forwards, where the
    scale is > 1; a sub-token with a scale <= 1 is not guided (the official rule): argmax of c."""
    m = _model(head_std=0.3)
    labels = torch.tensor([2, 5])
    s = (2.5, 0.5)
    idx = generate(m, labels, cfg_scales=s, temperatures=0.0)
    subs = m.split(idx.flatten(1))
    cond = m(subs, labels)
    uncond = m(subs, torch.full_like(labels, m.null_class))
    for k in range(2):
        mixed = uncond[k] + s[k] * (cond[k] - uncond[k]) if s[k] > 1 else cond[k]
        assert torch.equal(mixed.argmax(-1), subs[k])


def test_same_seed_same_tokens_different_seed_different():
    m = _model()
    labels = torch.tensor([0, 1, 2])
    a = generate(m, labels, generator=_gen(42))
    b = generate(m, labels, generator=_gen(42))
    c = generate(m, labels, generator=_gen(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_preset_defaults_and_per_subtoken_checks():
    cfg = with_overrides(TINY, cfg_scales=(3.0, 1.5), temperatures=(1.0, 0.7))
    m = _model(cfg)
    labels = torch.tensor([1])
    a = generate(m, labels, generator=_gen(0))
    b = generate(m, labels, cfg_scales=(3.0, 1.5), temperatures=(1.0, 0.7), generator=_gen(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        generate(m, labels, cfg_scales=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError):
        generate(m, torch.tensor([11]))  # beyond the null class


def test_top_k_one_is_greedy():
    m = _model(head_std=0.3)
    labels = torch.tensor([3, 8])
    greedy = generate(m, labels, temperatures=0.0)
    topk1 = generate(m, labels, top_k=1, generator=_gen(9))
    assert torch.equal(greedy, topk1)


def test_filter_logits_brute_force():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    keep = lambda out: (out > float("-inf")).squeeze(0).tolist()
    assert keep(filter_logits(logits, top_k=2)) == [True, False, True, False]
    # nucleus: sorted 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95. The official rule drops a
    # token when the mass before it is over top_p: 0.3's is exactly 0.5 (in float32 too), so it stays.
    assert keep(filter_logits(logits, top_p=0.5)) == [True, False, True, False]
    assert keep(filter_logits(logits, top_p=0.4999)) == [True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.75)) == [True, False, True, False]
    assert keep(filter_logits(logits, top_p=0.9)) == [True, False, True, True]
    assert keep(filter_logits(logits, top_p=0.01)) == [True, False, False, False]
    assert keep(filter_logits(logits, top_k=3, top_p=0.9)) == [True, False, True, True]


def test_draw_follows_the_tempered_distribution():
    n = 40000
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(n, 4)
    for temp in (1.0, 0.5):
        got = torch.bincount(draw(logits, temp, 0, 1.0, _gen(0)), minlength=4).float() / n
        p = torch.tensor([0.1, 0.2, 0.3, 0.4]) ** (1 / temp)
        p = p / p.sum()
        assert torch.allclose(got, p, atol=0.01), (temp, got, p)
    zero_mass = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(n, 4)
    picks = draw(zero_mass, 1.0, 0, 1.0, _gen(1))
    assert set(picks.unique().tolist()) == {0, 2}


# ---------------------------------------------------------------- CLI


def test_cli_writes_grid_and_adm_npz(tmp_path, tiny_tokenizer_ckpt):
    from stage1_tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(tiny_tokenizer_ckpt)
    m = _model()
    m.save(tmp_path / "ar")
    args = ["--ckpt", str(tmp_path / "ar"), "--tokenizer", str(tiny_tokenizer_ckpt), "--classes", "0,3,9",
            "--per-class", "2", "--npz", "--seed", "7", "--cfg", "2.0", "--batch-size", "4"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    side = TINY.grid[0] * tok.downsample_factor
    with np.load(tmp_path / "a" / "samples.npz") as z:  # the layout of stage2_ar.samples_npz
        assert z.files == ["arr_0", "arr_1"]
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.shape == (6, side, side, 3) and arr.dtype == np.uint8
    assert labels.tolist() == [0, 0, 3, 3, 9, 9]
    assert np.array_equal(arr, np.load(tmp_path / "b" / "samples.npz")["arr_0"])  # same seed, same images
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    pad = 2
    assert grid.shape == (3 * (side + pad) + pad, 2 * (side + pad) + pad, 3)  # one row per class
    # the grid shows the npz's very pixels (class 3's second sample: row 1, column 1)
    assert np.array_equal(grid[pad + side + pad:][:side, pad + side + pad:][:, :side], arr[3])


def test_cli_errors_are_one_line_exits(tmp_path):
    m = _model()
    m.save(tmp_path / "ar")
    base = ["--ckpt", str(tmp_path / "ar"), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra, msg in ((["--classes", "a,b"], "comma-separated integers"),
                       (["--classes", "0,10"], "outside"),
                       (["--classes", "0", "--cfg", "1,2,3"], "cfg")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert str(e.value).startswith("error:") and msg in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path / "missing"), "--tokenizer", str(tmp_path), "--classes", "0",
              "--out", str(tmp_path / "o")])
    assert "not a directory" in str(e.value)


def test_per_image_generators_make_images_independent_of_batching():
    m = _model()
    labels = torch.tensor([0, 5, 9])
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]
    together = generate(m, labels, cfg_scales=2.0, generator=gens([0, 1, 2]))
    first = generate(m, labels[:2], cfg_scales=2.0, generator=gens([0, 1]))
    last = generate(m, labels[2:], cfg_scales=2.0, generator=gens([2]))
    assert torch.equal(together, torch.cat([first, last]))
    with pytest.raises(ValueError, match="generators"):
        generate(m, labels, generator=gens([0]))


def test_sampling_a_bf16_cast_model_keeps_fp32_rope():
    m = _model().to(torch.bfloat16)
    assert m.rope.dtype == torch.float32 and m.class_emb.weight.dtype == torch.bfloat16
    fresh = _model()
    assert torch.equal(m.rope, fresh.rope)
    idx = generate(m, torch.tensor([1, 2]), cfg_scales=2.0, generator=_gen(0))
    assert idx.shape == (2, *TINY.grid) and idx.max() < 2 ** 18
