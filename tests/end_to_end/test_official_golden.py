"""Fidelity to the official code: both converters end to end against golden outputs of the official modules.

``tests/data/official/golden`` holds two tiny official checkpoints (random, seeded weights) together with the
inputs fed to the official implementation and what it returned (see the README there). Every test here starts
from the official file, runs our converter CLI, loads the result through our public loaders and reproduces one
recorded tensor within the tolerance the fixture's JSON gives for it. Every recorded output is its own test id,
and an output without a check fails, so a new fixture entry cannot be ignored.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.checkpoint import load_meta, load_state_dict
from stage1_tokenizer import convert_official as tok_convert
from stage1_tokenizer.lfq import entropy_terms
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_ar import convert_official as ar_convert
from stage2_ar.generate import generate
from stage2_ar.model import FactorizedAR, subtoken_loss

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "official" / "golden"
TOK_CKPT, AR_CKPT = GOLDEN / "tokenizer_tiny.ckpt", GOLDEN / "ar_tiny.ckpt"


def _fixture(name):
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    return meta, load_file(GOLDEN / f"{name}.inputs.safetensors"), load_file(GOLDEN / f"{name}.outputs.safetensors")


TOK_META, TOK_IN, TOK_OUT = _fixture("tokenizer_tiny")
AR_META, AR_IN, AR_OUT = _fixture("ar_tiny")
WEIGHT_SETS = ("raw", "ema")
ENTROPY_ARGS = TOK_META["fixed_in_official_code"]["LFQ.entropy_loss"]
GPT_ARGS = AR_META["constructor_args"]["src.Open_MAGVIT2.modules.transformer.gpt.GPT"]
SAMPLING = AR_META["sampling"]
GRID_SIDE = math.isqrt(GPT_ARGS["block_size"])  # block_size = h * w tokens of a square grid
# Facts the shapes cannot tell the AR converter (its defaults are those of the released models).
AR_FLAGS = ["--grid", f"{GRID_SIDE},{GRID_SIDE}", "--head-dim", str(GPT_ARGS["dim"] // GPT_ARGS["n_head"])]
# The official greedy sample (top_k 1) drawn with the KV cache, without it, and as a plain argmax (T = 0).
SAMPLE_VARIANTS = {
    "kv-cache": dict(use_cache=True),
    "no-cache": dict(use_cache=False),
    "kv-cache-argmax": dict(use_cache=True, temperatures=0.0),
}

# ------------------------------------------------------------------------------------------ tolerances

_NUM = r"([0-9.]+(?:e[-+]?[0-9]+)?)"


def bound(spec: str, ref: torch.Tensor):
    """The JSON's tolerance text -> the largest allowed max |ours - ref|; None means exact equality."""
    if spec == "exact":
        return None
    if m := re.fullmatch(rf"max abs diff <= {_NUM}", spec):
        return float(m[1])
    if m := re.fullmatch(rf"abs diff <= {_NUM} \* max\(1, \|value\|\)", spec):
        return float(m[1]) * max(1.0, abs(ref.item()))
    if m := re.match(rf"max abs diff <= {_NUM} \* max\|ref\| = {_NUM}", spec):
        b = float(m[1]) * ref.abs().max().item()
        assert b == pytest.approx(float(m[2]), rel=0.01), f"tolerance {spec!r} misread as {b}"
        return b
    raise AssertionError(f"tolerance text not understood: {spec!r}")


def check(key, ours, meta, recorded):
    """Compare our tensor with the recorded one under the JSON entry ``meta[key]``; returns max |diff|."""
    ref, spec = recorded[key], meta[key]
    assert str(ref.dtype) == f"torch.{spec['dtype']}" and list(ref.shape) == spec["shape"], "fixture out of sync"
    if "value" in spec:
        assert ref.item() == spec["value"], "fixture out of sync"
    assert tuple(ours.shape) == tuple(ref.shape), key
    limit = bound(spec["tolerance"], ref)
    if limit is None:
        assert not ours.dtype.is_floating_point, key
        assert torch.equal(ours.to(ref.dtype), ref), f"{key}: {(ours.to(ref.dtype) != ref).sum()} entries differ"
        return 0.0
    diff = (ours.detach().double() - ref.double()).abs().max().item()
    assert diff <= limit, f"{key}: max |diff| {diff:.3g} > {limit:.3g}"
    return diff


# ------------------------------------------------------------------------------------------ conversions


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both official checkpoints through our CLI entry points (in-process), as checkpoint directories."""
    root = tmp_path_factory.mktemp("golden")
    dirs = {}
    for w in WEIGHT_SETS:
        tok_convert.main([str(TOK_CKPT), str(root / f"tok-{w}"), "--weights", w])
        dirs[f"tok-{w}"] = root / f"tok-{w}"
    assert ar_convert.main([str(AR_CKPT), str(root / "ar"), *AR_FLAGS]) == 0
    dirs["ar"], dirs["ar-tok"] = root / "ar" / "ar", root / "ar" / "tokenizer"
    return dirs


@pytest.fixture(scope="module")
def tok_results(converted):
    """Our value of every tokenizer_tiny output."""
    out = {}
    images = TOK_IN["images"]
    for w in WEIGHT_SETS:
        tok = Tokenizer.from_checkpoint(converted[f"tok-{w}"])
        with torch.no_grad():
            z = tok.encode_latent(images)
            out[f"{w}.latent"] = z
            out[f"{w}.quantized"] = tok.quantize(z).quantized  # eval mode: no losses, as the official forward
        out[f"{w}.indices"] = tok.encode(images)
        out[f"{w}.reconstruction"] = tok.reconstruct(images)
        out[f"{w}.decoded_from_indices"] = tok.decode(TOK_OUT[f"{w}.indices"])
        # Training mode: the LFQ losses, on the recorded official latent.
        tok.train()
        q = tok.quantize(TOK_OUT[f"{w}.latent"])
        out[f"{w}.lfq_train.per_sample_entropy"] = q.per_sample_entropy
        out[f"{w}.lfq_train.codebook_entropy"] = q.codebook_entropy
        out[f"{w}.lfq_train.entropy_aux_loss"] = q.entropy_loss
        out[f"{w}.lfq_train.commitment"] = q.commitment
    # Unsaturated latent: losses and gradients of our (float32) LFQ, against the official float32 run and,
    # tightly, against the official float64 run.
    z = TOK_IN["lfq_z_small"].clone().requires_grad_(True)
    q = tok.quantize(z)
    (g_entropy,) = torch.autograd.grad(q.entropy_loss, z, retain_graph=True)
    (g_commit,) = torch.autograd.grad(q.commitment, z)
    for run in ("lfq_small", "lfq_small_fp64"):
        out[f"{run}.per_sample_entropy"] = q.per_sample_entropy
        out[f"{run}.codebook_entropy"] = q.codebook_entropy
        out[f"{run}.entropy_aux_loss"] = q.entropy_loss
        out[f"{run}.commitment"] = q.commitment
        out[f"{run}.grad_entropy_aux_loss"] = g_entropy
        out[f"{run}.grad_commitment"] = g_commit
    out["lfq_small.indices"] = q.indices
    return out


@pytest.fixture(scope="module")
def lfq_fp64_results():
    """The entropy terms in float64 (``entropy_terms``; the LFQ module itself runs in float32)."""
    z = TOK_IN["lfq_z_small"].double().requires_grad_(True)
    h_sample, h_codebook = entropy_terms(z.movedim(1, -1), ENTROPY_ARGS["temperature"])
    aux = ENTROPY_ARGS["sample_minimization_weight"] * h_sample - ENTROPY_ARGS["batch_maximization_weight"] * h_codebook
    (grad,) = torch.autograd.grad(aux, z)
    return {"lfq_small_fp64.per_sample_entropy": h_sample, "lfq_small_fp64.codebook_entropy": h_codebook,
            "lfq_small_fp64.entropy_aux_loss": aux, "lfq_small_fp64.grad_entropy_aux_loss": grad}


@pytest.fixture(scope="module")
def ar_models(converted):
    return FactorizedAR.from_checkpoint(converted["ar"]), Tokenizer.from_checkpoint(converted["ar-tok"])


@pytest.fixture(scope="module")
def ar_results(ar_models):
    """Our value of every ar_tiny output except the samples."""
    model, tok = ar_models
    subs, labels = (AR_IN["tf.pre"], AR_IN["tf.post"]), AR_IN["tf.labels"]
    with torch.no_grad():
        logits = model(subs, labels)
        out = {"tf.logits_pre": logits[0], "tf.logits_post": logits[1], "tf.loss": model.loss(subs, labels),
               "tf.loss_pre": subtoken_loss(logits[:1], subs[:1]), "tf.loss_post": subtoken_loss(logits[1:], subs[1:])}
    pre, post = model.split(tok.encode(AR_IN["fs.images"]))
    out["fs.indices_pre"], out["fs.indices_post"] = pre.flatten(1), post.flatten(1)
    out["rope.freqs_cis"] = model.rope
    return out


@pytest.fixture(scope="module")
def sample_results(ar_models):
    """Our greedy CFG sample and its decode, per variant."""
    model, tok = ar_models
    assert SAMPLING["steps"] == model.cfg.num_tokens
    out = {}
    for name, variant in SAMPLE_VARIANTS.items():
        kw = dict(cfg_scales=SAMPLING["cfg_scale"], temperatures=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
                  top_p=SAMPLING["top_p"], generator=torch.Generator().manual_seed(0))
        kw.update(variant)
        idx = generate(model, AR_IN["sample.classes"], **kw)
        pre, post = model.split(idx)
        out[name] = {"sample.pre": pre.flatten(1), "sample.post": post.flatten(1), "sample.indices": idx,
                     "sample.decoded": tok.decode(idx)}
    return out


# ------------------------------------------------------------------------------------------ the checks


def test_every_recorded_output_is_checked(tok_results, ar_results, sample_results):
    assert set(TOK_OUT) == set(TOK_META["outputs"]) and set(AR_OUT) == set(AR_META["outputs"])
    assert set(tok_results) == set(TOK_OUT)
    for variant in sample_results.values():
        assert set(ar_results) | set(variant) == set(AR_OUT)


@pytest.mark.parametrize("key", sorted(TOK_OUT))
def test_tokenizer_output(key, tok_results):
    assert key in tok_results, f"no check for the recorded output {key!r}"
    check(key, tok_results[key], TOK_META["outputs"], TOK_OUT)


@pytest.mark.parametrize("key", sorted(k for k in TOK_OUT if k.startswith("lfq_small_fp64.") and "commitment" not in k))
def test_lfq_entropy_in_float64(key, lfq_fp64_results):
    check(key, lfq_fp64_results[key], TOK_META["outputs"], TOK_OUT)


def test_converted_tokenizer_config_is_the_official_one(converted):
    dd = TOK_META["official_yaml_equivalent"]["model"]["init_args"]["ddconfig"]
    norms = TOK_META["fixed_in_official_code"]
    for w in WEIGHT_SETS:
        c = Tokenizer.from_checkpoint(converted[f"tok-{w}"]).cfg
        assert (c.ch, list(c.ch_mult), c.num_res_blocks, c.z_channels, c.in_channels, c.out_channels) == (
            dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"], dd["in_channels"], dd["out_ch"])
        groups, eps = re.match(rf"(\d+) groups, eps {_NUM}", norms["GroupNorm"]).groups()
        assert (c.norm_groups, c.norm_eps) == (int(groups), float(eps))
        assert c.adanorm_eps == float(re.match(rf"eps {_NUM}", norms["AdaptiveGroupNorm"])[1])
        assert c.codebook_scale == float(re.search(rf"scale {_NUM}", norms["codebook"])[1])
        assert (c.entropy_temperature, c.sample_entropy_weight, c.codebook_entropy_weight) == (
            ENTROPY_ARGS["temperature"], ENTROPY_ARGS["sample_minimization_weight"],
            ENTROPY_ARGS["batch_maximization_weight"])


@pytest.mark.parametrize("key", sorted(k for k in AR_OUT if not k.startswith("sample.")))
def test_ar_output(key, ar_results):
    assert key in ar_results, f"no check for the recorded output {key!r}"
    check(key, ar_results[key], AR_META["outputs"], AR_OUT)


@pytest.mark.parametrize("variant", sorted(SAMPLE_VARIANTS))
@pytest.mark.parametrize("key", sorted(k for k in AR_OUT if k.startswith("sample.")))
def test_ar_sample_output(key, variant, sample_results):
    assert key in sample_results[variant], f"no check for the recorded output {key!r}"
    check(key, sample_results[variant][key], AR_META["outputs"], AR_OUT)


def test_official_sub_token_split_is_ours(ar_models):
    model, _ = ar_models
    pre, post = model.split(AR_IN["tf.indices"])
    assert torch.equal(pre, AR_IN["tf.pre"]) and torch.equal(post, AR_IN["tf.post"])
    assert torch.equal(model.join((pre, post)), AR_IN["tf.indices"])


def test_converted_ar_config_is_the_official_one(ar_models):
    model, tok = ar_models
    c, g = model.cfg, GPT_ARGS
    assert c.grid == (GRID_SIDE, GRID_SIDE) and c.num_tokens == g["block_size"]
    assert (c.dim, c.n_head, c.n_inter, c.n_intra, c.num_classes, tuple(c.bits)) == (
        g["dim"], g["n_head"], g["spatial_n_layer"], g["factorized_n_layer"], g["class_num"],
        tuple(g["factorized_bits"]))
    assert c.rope_base == g["rope_base"] and c.norm_eps == g["norm_eps"] and c.rope_zero_cls
    assert c.ffn_hidden == int(re.search(r"= (\d+)$", AR_META["derived"]["ffn_hidden"])[1])
    assert tok.bits == sum(c.bits)


def _run_cli(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return proc


def _same_checkpoint(a, b):
    sa, sb = load_state_dict(a), load_state_dict(b)
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load_meta(a)["config"] == load_meta(b)["config"]


def test_tokenizer_cli_subprocess(tmp_path, converted):
    """The real ``python -m`` entry point writes what the in-process run (checked above) wrote."""
    _run_cli("stage1_tokenizer.convert_official", TOK_CKPT, tmp_path / "tok", "--weights", "ema")
    _same_checkpoint(tmp_path / "tok", converted["tok-ema"])


def test_ar_cli_subprocess(tmp_path, converted):
    _run_cli("stage2_ar.convert_official", AR_CKPT, tmp_path / "ar", *AR_FLAGS)
    _same_checkpoint(tmp_path / "ar" / "ar", converted["ar"])
    _same_checkpoint(tmp_path / "ar" / "tokenizer", converted["ar-tok"])


def test_ar_geometry_without_flags_is_inferred_or_refused(tmp_path, converted):
    """The golden file is no released architecture and stores no RoPE table: without --grid / --head-dim it
    is refused in one line, nothing written (it used to become a 1-head 16x16 model with wrong logits). With
    the official RoPE table (GPT.freqs_cis, recorded in the fixture) stored, both are read from it."""
    with pytest.raises(SystemExit) as e:
        ar_convert.main([str(AR_CKPT), str(tmp_path / "none")])
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and "pass --grid H,W and --head-dim D" in msg
    with pytest.raises(SystemExit, match=r"error: .*pass --head-dim D \("):  # the grid alone does not do
        ar_convert.main([str(AR_CKPT), str(tmp_path / "none"), "--grid", AR_FLAGS[1]])
    assert not (tmp_path / "none").exists()
    official = torch.load(AR_CKPT, map_location="cpu", weights_only=True)
    official["state_dict"]["transformer.freqs_cis"] = AR_OUT["rope.freqs_cis"]
    torch.save(official, tmp_path / "with_rope.ckpt")
    assert ar_convert.main([str(tmp_path / "with_rope.ckpt"), str(tmp_path / "rope")]) == 0
    _same_checkpoint(tmp_path / "rope" / "ar", converted["ar"])
    assert FactorizedAR.from_checkpoint(tmp_path / "rope" / "ar").cfg.n_head == GPT_ARGS["n_head"]
    with pytest.raises(SystemExit, match=r"error: --head-dim 32 contradicts the file's RoPE table"):
        ar_convert.main([str(tmp_path / "with_rope.ckpt"), str(tmp_path / "x"), "--head-dim", "32"])
