"""Stage-1 encoder/decoder and the Tokenizer API: exact official sizes and shapes, round trips, checkpoints."""
import math
import re
from pathlib import Path

import pytest
import torch

from shared.checkpoint import CheckpointError, save_checkpoint
from shared.tokens import index_to_bits
from stage1_tokenizer.config import PRESETS, TokenizerConfig
from stage1_tokenizer.lfq import QuantizerOutput
from stage1_tokenizer.model import AdaptiveGroupNorm, count_parameters
from stage1_tokenizer.tokenizer import Tokenizer

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "official" / "keys"
OFFICIAL = {"tokenizer-16x-256": "tokenizer_256_L_16x", "tokenizer-8x-128": "tokenizer_128_L_8x"}


def meta_model(preset):
    with torch.device("meta"):
        return Tokenizer(PRESETS[preset])


@pytest.mark.parametrize(
    "preset, enc, dec, total",
    [("tokenizer-16x-256", 49_751_442, 65_376_387, 115_127_829), ("tokenizer-8x-128", 48_422_162, 63_599_491, 112_021_653)],
)
def test_official_presets_have_exact_parameter_counts(preset, enc, dec, total):
    m = meta_model(preset)
    assert count_parameters(m.encoder) == enc
    assert count_parameters(m.decoder) == dec
    assert count_parameters(m) == total
    assert count_parameters(m.quantizer) == 0 and len(m.quantizer.state_dict()) == 0
    assert m.downsample_factor * 16 == PRESETS[preset].resolution and m.bits == 18


def _our_module_to_official(name: str) -> str:
    rules = [
        (r"^encoder\.stem$", "encoder.conv_in"), (r"^encoder\.to_latent$", "encoder.conv_out"),
        (r"^encoder\.levels\.(\d+)\.blocks\.(\d+)$", r"encoder.down.\1.block.\2"),
        (r"^encoder\.levels\.(\d+)\.down$", r"encoder.down.\1.downsample"),
        (r"^(encoder|decoder)\.mid\.(\d+)$", r"\1.mid_block.\2"), (r"^quantizer$", "quantize"),
        (r"^decoder\.from_latent$", "decoder.conv_in"), (r"^decoder\.to_rgb$", "decoder.conv_out"),
        (r"^decoder\.levels\.(\d+)\.adanorm$", r"decoder.adaptive.\1"),
        (r"^decoder\.levels\.(\d+)\.blocks\.(\d+)$", r"decoder.up.\1.block.\2"),
        (r"^decoder\.levels\.(\d+)\.up$", r"decoder.up.\1.upsample"),
    ]
    for pattern, repl in rules:
        out, hit = re.subn(pattern, repl, name)
        if hit:
            return out
    return ""


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_activation_shapes_match_the_official_dump(preset):
    """Shape-only forward on the meta device, module by module, against the official execution trace."""
    tsv = REFERENCE / f"{OFFICIAL[preset]}__activation_shapes.tsv"
    expected = []
    for line in tsv.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, _, cin, cout = line.split("\t")
        expected.append((name, cin, cout))
    m = meta_model(preset).eval()
    seen = []

    def hook(name):
        def fn(module, inputs, output):
            fmt = lambda t: "x".join(str(s) for s in t.shape[1:])
            out = output.quantized if isinstance(output, QuantizerOutput) else output
            seen.append((name, fmt(inputs[0]), fmt(out)))
        return fn

    for name, module in m.named_modules():
        if (official := _our_module_to_official(name)):
            module.register_forward_hook(hook(official))
    r = PRESETS[preset].resolution
    with torch.no_grad():
        z = m.encode_latent(torch.empty(1, 3, r, r, device="meta"))
        m.decode_latent(m.quantize(z, with_losses=False).quantized)
    assert seen == expected


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tokenizer(PRESETS["tokenizer-tiny"]).eval()


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_encode_decode_reconstruct_round_trip(tiny):
    x = _images(2, 16, 16)
    idx = tiny.encode(x)
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.int64
    assert 0 <= idx.min() and idx.max() < 2 ** 18
    assert len(idx.unique()) > 32  # a random net still spreads tokens over the codebook
    out = tiny.decode(idx)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, tiny.reconstruct(x))  # decode(encode(x)) is exactly the reconstruction
    z = tiny.encode_latent(x)
    assert z.shape == (2, 18, 8, 8)
    assert torch.equal(idx, sum(((z[:, c] > 0).long() << c) for c in range(18)))
    # the latent fed to the decoder is the +-1 bit pattern of the indices
    assert torch.equal(tiny.indices_to_latent(idx), index_to_bits(idx, 18).movedim(-1, 1))


@pytest.mark.parametrize("h, w", [(2, 2), (6, 10), (24, 40)])
def test_any_resolution_divisible_by_the_factor(tiny, h, w):
    idx = tiny.encode(_images(1, h, w))
    assert idx.shape == (1, h // 2, w // 2)
    assert tiny.decode(idx).shape == (1, 3, h, w)


def test_bad_inputs_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="multiple of the downsampling factor 2"):
        tiny.encode(_images(1, 15, 16))
    with pytest.raises(ValueError, match="expected images"):
        tiny.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="indices must be integers"):
        tiny.decode(torch.full((1, 2, 2), 2 ** 18))


def test_demo_preset_gives_16_tokens_at_32px():
    m = Tokenizer(PRESETS["tokenizer-demo"]).eval()
    assert m.downsample_factor == 8
    assert m.encode(_images(1, 32, 32)).shape == (1, 4, 4)


def test_training_forward_returns_losses_and_gradients_reach_the_encoder():
    torch.manual_seed(1)
    m = Tokenizer(PRESETS["tokenizer-tiny"]).train()
    x = _images(2, 8, 8, seed=1)
    rec, q = m(x)
    assert rec.shape == x.shape and isinstance(q, QuantizerOutput)
    assert q.indices.shape == (2, 4, 4)
    for t in (q.per_sample_entropy, q.codebook_entropy, q.commitment, q.entropy_loss):
        assert t.dim() == 0 and torch.isfinite(t)
    assert torch.allclose(q.entropy_loss, q.per_sample_entropy - q.codebook_entropy)
    # reconstruction loss reaches the encoder through the straight-through estimator
    (rec - x).abs().mean().backward(retain_graph=True)
    assert m.encoder.stem.weight.grad.abs().sum() > 0
    m.zero_grad()
    q.entropy_loss.backward()
    assert m.encoder.stem.weight.grad.abs().sum() > 0 and m.decoder.to_rgb.weight.grad is None


def test_adaptive_group_norm_uses_unbiased_std_of_the_latent():
    cfg = PRESETS["tokenizer-tiny"]
    torch.manual_seed(2)
    ada = AdaptiveGroupNorm(cfg, 16)
    x, zq = torch.randn(2, 16, 6, 6), torch.randn(2, 18, 3, 3).sign()
    flat = zq.flatten(2)
    n = flat.shape[-1]
    mean = flat.sum(-1) / n
    std = torch.sqrt(((flat - mean[..., None]) ** 2).sum(-1) / (n - 1) + 1e-6)  # unbiased: / (n - 1)
    xg = x.view(2, 8, -1)
    normed = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-6)).view_as(x)
    expected = normed * (std @ ada.to_scale.weight.T + ada.to_scale.bias)[..., None, None] + (
        mean @ ada.to_shift.weight.T + ada.to_shift.bias)[..., None, None]
    assert torch.allclose(ada(x, zq), expected, atol=1e-5)


def test_save_and_from_checkpoint_round_trip(tiny, tmp_path):
    path = tiny.save(tmp_path / "tok", extra={"step": 7})
    back = Tokenizer.from_checkpoint(path)
    assert back.cfg == tiny.cfg and not back.training
    x = _images(2, 16, 16, seed=3)
    assert torch.equal(back.encode(x), tiny.encode(x))
    assert torch.equal(back.reconstruct(x), tiny.reconstruct(x))
    save_checkpoint(tmp_path / "ar", {}, {}, kind="ar")
    with pytest.raises(CheckpointError, match="expected 'tokenizer'"):
        Tokenizer.from_checkpoint(tmp_path / "ar")


def test_config_overrides_and_validation():
    from shared.config import resolve

    cfg = resolve(TokenizerConfig, PRESETS, "tokenizer-tiny", ["entropy_temperature=0.05", "global_codebook_entropy=true"])
    assert cfg.entropy_temperature == 0.05 and cfg.global_codebook_entropy and cfg.ch_mult == (1, 2)
    m = Tokenizer(cfg)
    assert m.quantizer.temperature == 0.05 and m.quantizer.global_codebook_entropy
    with pytest.raises(ValueError, match="norm_groups"):
        Tokenizer(TokenizerConfig(ch=20, ch_mult=(1,), norm_groups=8))


def test_fast_paths_channels_last_and_bf16_agree(tiny):
    x = _images(2, 16, 16, seed=4)
    ref_idx, ref_rec = tiny.encode(x), tiny.reconstruct(x)
    fast = Tokenizer(tiny.cfg)
    fast.load_state_dict(tiny.state_dict())
    fast.eval().channels_last()
    assert fast.encoder.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert (fast.encode(x) == ref_idx).float().mean() > 0.99
    assert torch.allclose(fast.reconstruct(x), ref_rec, atol=1e-4)
    # bf16 autocast: bits of latents very close to 0 may flip; nearly all tokens' bits must agree
    bits16 = index_to_bits(fast.encode(x, precision="bf16"), 18)
    assert (bits16 == index_to_bits(ref_idx, 18)).float().mean() > 0.97
    rec16 = fast.decode(ref_idx, precision="bf16")
    assert rec16.dtype == torch.float32 and (rec16 - tiny.decode(ref_idx)).abs().mean() < 0.05


@pytest.mark.big
def test_full_size_models_run_at_their_own_and_at_higher_resolution():
    torch.manual_seed(0)
    for preset, r in (("tokenizer-16x-256", 256), ("tokenizer-8x-128", 256)):
        m = Tokenizer(PRESETS[preset]).eval()
        idx = m.encode(_images(1, r, r))
        f = m.downsample_factor
        assert idx.shape == (1, r // f, r // f)
        assert m.decode(idx).shape == (1, 3, r, r)
        assert math.isfinite(m.decode(idx).abs().mean().item())
