"""Official checkpoint conversion: exact key mapping, EMA/raw selection, strict loading, DCR depth-to-space."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shared.checkpoint import CheckpointError, load_meta, load_strict
from stage1_tokenizer.config import PRESETS
from stage1_tokenizer.convert_official import (
    convert_tokenizer_state,
    dcr_to_pixel_shuffle,
    ema_name,
    infer_config,
    main,
    official_key_map,
)
from stage1_tokenizer.tokenizer import Tokenizer

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "official" / "keys"
OFFICIAL = {"tokenizer-16x-256": "tokenizer_256_L_16x", "tokenizer-8x-128": "tokenizer_128_L_8x"}


def _tsv(name):
    rows = [line.split("\t") for line in (REFERENCE / name).read_text().splitlines() if not line.startswith("#")]
    return rows


def _expected_keys(preset):
    """{official key: (shape, dtype)} of the released checkpoint's state_dict."""
    out = {}
    for key, shape, dtype, _ in _tsv(f"{OFFICIAL[preset]}__released_ckpt_expected_keys.tsv"):
        out[key] = (() if shape == "scalar" else tuple(int(s) for s in shape.split("x")), dtype)
    return out


def depth_to_space_dcr(y: torch.Tensor) -> torch.Tensor:
    """Independent DCR depth-to-space x2: out[c, 2h + dy, 2w + dx] = y[(2 dy + dx) * C + c, h, w]."""
    b, c4, h, w = y.shape
    c = c4 // 4
    out = torch.empty(b, c, 2 * h, 2 * w, dtype=y.dtype)
    for dy in range(2):
        for dx in range(2):
            out[:, :, dy::2, dx::2] = y[:, (2 * dy + dx) * c:(2 * dy + dx + 1) * c]
    return out


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_our_names_map_exactly_onto_the_official_keys(preset):
    expected = _expected_keys(preset)
    mapping = official_key_map(PRESETS[preset])
    raw = {k: v for k, v in expected.items() if not k.startswith("model_ema.")}
    assert sorted(mapping.values()) == sorted(raw)
    with torch.device("meta"):
        ours = Tokenizer(PRESETS[preset]).state_dict()
    assert all(tuple(ours[k].shape) == raw[o][0] for k, o in mapping.items())
    # EMA names: our rule reproduces the official LitEma mapping, entry for entry
    ema_map = {e: p for e, p in _tsv(f"{OFFICIAL[preset]}__ema_name_mapping.tsv") if p.startswith(("encoder.", "decoder."))}
    assert {ema_name(o): o for o in mapping.values()} == ema_map
    assert set(ema_map) | {"model_ema.decay", "model_ema.num_updates"} == {k for k in expected if k.startswith("model_ema.")}


def _synthetic_official(preset, seed=0):
    """A stand-in for the released file: every listed key, random values of the listed shape, EMA != raw."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in _expected_keys(preset).items():
        if dtype == "int32":
            sd[key] = torch.tensor(1234, dtype=torch.int32)
        else:
            sd[key] = torch.empty(shape).normal_(generator=g) if shape else torch.tensor(0.999)
    return sd


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_synthetic_official_checkpoint_converts_loads_strictly_and_upsamples_as_dcr(preset):
    sd = _synthetic_official(preset)
    cfg = infer_config(sd)
    assert cfg == PRESETS[preset]
    mapping = official_key_map(cfg)
    for weights in ("ema", "raw"):
        model = Tokenizer.empty(cfg)

        load_strict(model, convert_tokenizer_state(sd, weights=weights))  # strict: no missing/extra/shape errors
        params = model.state_dict()
        src = (lambda o: sd[ema_name(o)]) if weights == "ema" else (lambda o: sd[o])
        ups = [k for k in mapping if ".up.conv." in k]
        assert len(ups) == 2 * (len(cfg.ch_mult) - 1)
        for ours, official in mapping.items():
            if ours not in ups:
                assert torch.equal(params[ours], src(official)), ours
        # every upsampler: our conv + PixelShuffle == official conv + DCR depth-to-space
        g = torch.Generator().manual_seed(1)
        for i in range(1, len(cfg.ch_mult)):
            w = src(f"decoder.up.{i}.upsample.conv1.weight")
            b = src(f"decoder.up.{i}.upsample.conv1.bias")
            x = torch.randn(1, w.shape[1], 3, 4, generator=g)
            expected = depth_to_space_dcr(F.conv2d(x, w, b, padding=1))
            with torch.no_grad():
                got = model.decoder.levels[i].up(x)
            assert got.shape == (1, w.shape[1], 6, 8)
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)
            # and the permutation is not a no-op: without it the output differs
            assert not torch.allclose(F.pixel_shuffle(F.conv2d(x, w, b, padding=1), 2), expected, atol=1e-2)


def test_dcr_permutation_small_exhaustive():
    c = 3
    w = torch.randn(4 * c, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(4 * c, dtype=torch.float64)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    ref = depth_to_space_dcr(F.conv2d(x, w, b, padding=1))
    ours = F.pixel_shuffle(F.conv2d(x, dcr_to_pixel_shuffle(w), dcr_to_pixel_shuffle(b), padding=1), 2)
    assert torch.equal(ours, ref)
    # channel c*4 + k takes channel k*C + c
    idx = dcr_to_pixel_shuffle(torch.arange(4 * c))
    assert idx.tolist() == [k * c + ch for ch in range(c) for k in range(4)]


def _tiny_as_official(model, ema_model=None):
    """Our tiny model's weights written under official names (inverse permutation), raw + EMA sets."""
    inv = lambda t: t.reshape(t.shape[0] // 4, 4, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # CRD -> DCR
    sd = {}
    for tag, m in (("raw", model), ("ema", ema_model)):
        if m is None:
            continue
        for ours, official in official_key_map(m.cfg).items():
            t = m.state_dict()[ours].clone()
            t = inv(t) if ".up.conv." in ours else t
            sd[official if tag == "raw" else ema_name(official)] = t
    if ema_model is not None:
        sd["model_ema.decay"] = torch.tensor(0.999)
        sd["model_ema.num_updates"] = torch.tensor(5, dtype=torch.int32)
    return sd


def test_cli_converts_ema_and_raw_end_to_end(tmp_path):
    torch.manual_seed(0)
    raw, ema = Tokenizer(PRESETS["tokenizer-tiny"]).eval(), Tokenizer(PRESETS["tokenizer-tiny"]).eval()
    sd = _tiny_as_official(raw, ema)
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)  # other parts of a training file are ignored
    ckpt = tmp_path / "official.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, ckpt)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    for weights, ref in (("ema", ema), ("raw", raw)):
        out = tmp_path / f"conv-{weights}"
        main([str(ckpt), str(out), "--weights", weights])
        tok = Tokenizer.from_checkpoint(out)
        assert tok.cfg == PRESETS["tokenizer-tiny"]
        assert torch.equal(tok.encode(x), ref.encode(x))
        assert torch.allclose(tok.reconstruct(x), ref.reconstruct(x), atol=1e-6)
        meta = load_meta(out)
        assert meta["kind"] == "tokenizer" and meta["extra"]["weights"] == weights


def test_cli_shows_progress_reading_and_writing(tmp_path, capsys, monkeypatch):
    """The two long phases of converting a large release (GBs): lines with an ETA in a log."""
    from shared.progress import scaled
    from shared.safetensors_writer import tensor_bytes

    monkeypatch.setenv("PROGRESS_MODE", "lines")
    monkeypatch.setenv("PROGRESS_INTERVAL", "0")
    torch.manual_seed(0)
    sd = _tiny_as_official(Tokenizer(PRESETS["tokenizer-tiny"]), Tokenizer(PRESETS["tokenizer-tiny"]))
    torch.save({"state_dict": sd}, tmp_path / "official.ckpt")
    main([str(tmp_path / "official.ckpt"), str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    reading = [line for line in err if line.startswith("reading official.ckpt: ")]
    writing = [line for line in err if line.startswith("writing out/model.safetensors: ")]
    assert reading and writing and "(100%) B done in" in reading[-1] and "(100%) B done in" in writing[-1]
    n = scaled(tensor_bytes(Tokenizer.from_checkpoint(tmp_path / "out").state_dict()))
    assert writing[-1].startswith(f"writing out/model.safetensors: {n}/{n} (100%)")


def test_cli_says_which_set_is_for_what_and_the_output_records_it(tmp_path, capsys):
    from shared.token_dataset.provenance import tokenizer_identity, tokenizer_weights

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "for reconstruction evaluation" in text and "for encoding tokens for AR training" in text
    torch.manual_seed(0)
    sd = _tiny_as_official(Tokenizer(PRESETS["tokenizer-tiny"]), Tokenizer(PRESETS["tokenizer-tiny"]))
    torch.save({"state_dict": sd}, tmp_path / "official.ckpt")
    for weights in ("ema", "raw"):
        out = tmp_path / weights
        main([str(tmp_path / "official.ckpt"), str(out), "--weights", weights])
        assert tokenizer_weights(out) == weights
        assert tokenizer_identity(out, load_meta(out)["config"])["weights"] == weights  # what a manifest records


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    with pytest.raises(SystemExit, match="error: no such file"):
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "o")])
    torch.manual_seed(0)
    sd = _tiny_as_official(Tokenizer(PRESETS["tokenizer-tiny"]))  # raw only, like the AR file's tokenizer
    ckpt = tmp_path / "raw.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    with pytest.raises(SystemExit, match="try --weights raw"):
        main([str(ckpt), str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="unknown preset"):
        main([str(ckpt), str(tmp_path / "o"), "--config", "nope"])
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {**sd, "encoder.extra.weight": torch.zeros(1)}}, bad)
    with pytest.raises(SystemExit, match="no place in our model"):
        main([str(bad), str(tmp_path / "o"), "--weights", "raw"])
    assert not (tmp_path / "o").exists()


def test_cli_records_the_source_and_reads_the_tokenizer_half_of_an_ar_file(tmp_path):
    import hashlib

    from stage1_tokenizer.convert_official import load_official

    torch.manual_seed(0)
    model = Tokenizer(PRESETS["tokenizer-tiny"]).eval()
    sd = {"first_stage_model." + k: v for k, v in _tiny_as_official(model).items()}
    sd["transformer.pre_emb.weight"] = torch.zeros(64, 8)
    torch.save({"state_dict": sd}, tmp_path / "AR.ckpt")
    with pytest.raises(SystemExit, match="no EMA weights found: try --weights raw"):
        main([str(tmp_path / "AR.ckpt"), str(tmp_path / "o")])
    main([str(tmp_path / "AR.ckpt"), str(tmp_path / "o"), "--weights", "raw"])
    got = Tokenizer.from_checkpoint(tmp_path / "o")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in got.state_dict().items())
    extra = load_meta(tmp_path / "o")["extra"]
    assert extra["prefix"] == "first_stage_model." and extra["weights"] == "raw"
    assert extra["source"]["sha256"] == hashlib.sha256((tmp_path / "AR.ckpt").read_bytes()).hexdigest()
    assert load_official(tmp_path / "AR.ckpt", weights=None)[1]["weights"] == "raw"  # auto: what the file has


def test_prefixed_raw_weights_as_in_an_ar_checkpoint():
    torch.manual_seed(0)
    model = Tokenizer(PRESETS["tokenizer-tiny"]).eval()
    sd = {"first_stage_model." + k: v for k, v in _tiny_as_official(model).items()}
    sd["transformer.pre_emb.weight"] = torch.zeros(64, 8)
    converted = convert_tokenizer_state(sd, prefix="first_stage_model.", weights="raw")
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="no official tokenizer weights"):
        convert_tokenizer_state(sd, weights="raw")  # wrong prefix
