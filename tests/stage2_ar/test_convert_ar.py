"""Official AR checkpoint converter: key lists of the released models, and synthetic checkpoints end to end."""
import re
from pathlib import Path

import pytest
import torch

from shared.checkpoint import CheckpointError
from stage2_ar.config import PRESETS
from stage2_ar.convert_official import (convert, convert_ar_state, infer_config, main, official_key_map,
                                       resolve_geometry)
from stage2_ar.model import FactorizedAR, count_params

REF = Path(__file__).resolve().parents[1] / "data" / "official" / "keys"
TINY = PRESETS["ar-tiny"]


def _read_keys(name):
    text = (REF / name).read_text().splitlines()
    header = "\n".join(l for l in text if l.startswith("#"))
    rows = {}
    for line in text:
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _, numel = line.split("\t")
        rows[key] = (tuple(int(s) for s in shape.split("x")), int(numel))
    return header, rows


def _expand_blocks(rows, n_spatial, n_factorized):
    """The compact dumps list block 0 only; every block has the same shapes."""
    out = {}
    for key, v in rows.items():
        m = re.match(r"^(transformer\.(spatial|factorized)_blocks\.)0\.(.*)$", key)
        if not m:
            out[key] = v
            continue
        n = n_spatial if m.group(2) == "spatial" else n_factorized
        for b in range(n):
            out[f"{m.group(1)}{b}.{m.group(3)}"] = v
    return out


def _meta_sd(rows):
    return {k: torch.empty(shape, device="meta") for k, (shape, _) in rows.items()}


def test_key_map_matches_the_official_B_key_list():
    header, rows = _read_keys("ar_B__transformer_state_dict.tsv")
    assert "entries=188" in header
    with torch.device("meta"):
        ours = FactorizedAR(PRESETS["ar-B"]).state_dict()
    mapping = official_key_map(PRESETS["ar-B"])
    assert {"transformer." + v for v in mapping.values()} == set(rows)
    for k, v in mapping.items():
        assert tuple(ours[k].shape) == rows["transformer." + v][0], k
    assert infer_config(_meta_sd(rows)) == PRESETS["ar-B"]
    assert resolve_geometry(_meta_sd(rows)) == ((16, 16), 64)  # a released architecture needs no flags


@pytest.mark.parametrize("name,preset,n_sp,n_fa", [("L", "ar-L", 36, 3), ("XL", "ar-XL", 48, 4)])
def test_key_map_matches_the_official_L_XL_key_lists(name, preset, n_sp, n_fa):
    header, rows = _read_keys(f"ar_{name}__transformer_state_dict_compact.tsv")
    full = _expand_blocks(rows, n_sp, n_fa)
    entries = int(re.search(r"entries\(full\)=(\d+)", header).group(1))
    numel = int(re.search(r"total_numel=(\d+)", header).group(1))
    assert len(full) == entries and sum(n for _, n in full.values()) == numel == count_params(PRESETS[preset])
    cfg = infer_config(_meta_sd(full))
    assert cfg == PRESETS[preset]  # carries the paper sampling settings of that preset
    with torch.device("meta"):
        ours = FactorizedAR(cfg).state_dict()
    mapping = official_key_map(cfg)
    assert {"transformer." + v for v in mapping.values()} == set(full)
    assert all(tuple(ours[k].shape) == full["transformer." + v][0] for k, v in mapping.items())


# ---------------------------------------------------------------- synthetic checkpoints end to end


def _official_from_ours(model):
    return {"transformer." + v: model.state_dict()[k].clone() for k, v in official_key_map(model.cfg).items()}


def _tiny_tokenizer_official():
    """A tiny tokenizer stored the official way: raw names, DCR order in the upsampling convs."""
    from stage1_tokenizer import config as tc
    from stage1_tokenizer import convert_official as conv
    from stage1_tokenizer import tokenizer as tk

    torch.manual_seed(1)
    tok = tk.Tokenizer(tc.PRESETS["tokenizer-tiny"]).eval()
    sd = tok.state_dict()
    official = {}
    for ours, name in conv.official_key_map(tok.cfg).items():
        t = sd[ours].clone()
        if re.match(r"^decoder\.levels\.\d+\.up\.conv\.", ours):  # undo PixelShuffle order: CRD -> DCR
            t = t.reshape(t.shape[0] // 4, 4, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        official["first_stage_model." + name] = t
    return tok, official


def _model():
    torch.manual_seed(0)
    m = FactorizedAR(TINY)
    for h in m.heads:
        torch.nn.init.normal_(h.weight, std=0.05)
    return m.eval()


def test_convert_synthetic_checkpoint_end_to_end(tmp_path):
    ar = _model()
    tok, tok_sd = _tiny_tokenizer_official()
    sd = {**_official_from_ours(ar), **tok_sd}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "AR_tiny.ckpt")
    rc = main([str(tmp_path / "AR_tiny.ckpt"), str(tmp_path / "out"), "--grid", "4,4",
               "--head-dim", "16", "--tokenizer-preset", "tokenizer-tiny"])
    assert rc == 0
    back = FactorizedAR.from_checkpoint(tmp_path / "out" / "ar")
    assert (back.cfg.dim, back.cfg.n_head, back.cfg.grid, back.cfg.num_classes) == (64, 4, (4, 4), 10)
    assert back.cfg.ffn_hidden == TINY.ffn_hidden
    g = torch.Generator().manual_seed(0)
    subs = tuple(torch.randint(0, v, (2, 16), generator=g) for v in TINY.vocab_sizes)
    labels = torch.tensor([1, 2])
    assert all(torch.equal(a, b) for a, b in zip(ar(subs, labels), back(subs, labels)))

    from stage1_tokenizer.tokenizer import Tokenizer

    tok_back = Tokenizer.from_checkpoint(tmp_path / "out" / "tokenizer")
    idx = torch.randint(0, 2 ** 18, (1, 4, 4), generator=g)
    assert torch.allclose(tok.decode(idx), tok_back.decode(idx), atol=1e-6)


def test_convert_shows_progress_reading_and_writing_both_halves(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROGRESS_MODE", "lines")
    monkeypatch.setenv("PROGRESS_INTERVAL", "0")
    tok, tok_sd = _tiny_tokenizer_official()
    torch.save({"state_dict": {**_official_from_ours(_model()), **tok_sd}}, tmp_path / "AR_tiny.ckpt")
    assert main([str(tmp_path / "AR_tiny.ckpt"), str(tmp_path / "out"), "--grid", "4,4", "--head-dim", "16",
                 "--tokenizer-preset", "tokenizer-tiny"]) == 0
    finals = [line for line in capsys.readouterr().err.splitlines() if "(100%) B done in" in line]
    assert [line.split(":")[0] for line in finals] == [
        "reading AR_tiny.ckpt", "writing ar/model.safetensors", "writing tokenizer/model.safetensors"]


def test_convert_ar_half_only_and_strictness(tmp_path):
    ar = _model()
    sd = _official_from_ours(ar)
    torch.save({"state_dict": sd}, tmp_path / "a.ckpt")
    written = convert(tmp_path / "a.ckpt", tmp_path / "o", grid=(4, 4), head_dim=16, skip_tokenizer=True)
    assert set(written) == {"ar"}
    cfg = infer_config(sd, grid=(4, 4), head_dim=16)
    assert cfg.n_head == TINY.n_head
    # a missing tensor and an extra tensor are both errors
    short = dict(sd)
    short.pop("transformer.norm.weight")
    with pytest.raises(CheckpointError, match="missing"):
        convert_ar_state(short, cfg)
    extra = {**sd, "transformer.spare.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="no place"):
        convert_ar_state(extra, cfg)
    torch.save({"state_dict": {**sd, "optimizer_thing": torch.zeros(1)}}, tmp_path / "b.ckpt")
    with pytest.raises(SystemExit, match="neither half"):
        main([str(tmp_path / "b.ckpt"), str(tmp_path / "o2"), "--skip-tokenizer", "--grid", "4,4"])
    with pytest.raises(SystemExit, match="no such file"):
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "o3")])


def test_convert_refuses_pickled_code(tmp_path):
    import datetime  # any global outside the weights-only allow list stands in for arbitrary code

    torch.save({"state_dict": {"x": datetime.datetime(2024, 9, 9)}}, tmp_path / "evil.ckpt")
    with pytest.raises(SystemExit, match=r"error: refusing .*'x' \(datetime\.datetime\)") as e:
        main([str(tmp_path / "evil.ckpt"), str(tmp_path / "o")])
    assert "\n" not in e.value.code and "weights_only" not in e.value.code and "\x1b" not in e.value.code


def test_lightning_extras_are_no_obstacle_and_the_source_is_recorded(tmp_path):
    """Hyper-parameters as numpy values and an argparse Namespace (refused by torch's weights-only loader)."""
    import argparse
    import hashlib

    import numpy as np

    from shared.checkpoint import load_meta

    ar = _model()
    _, tok_sd = _tiny_tokenizer_official()
    sd = {**_official_from_ours(ar), **tok_sd}
    torch.save({"state_dict": sd, "hyper_parameters": {"lr": np.float64(3e-4), "args": argparse.Namespace(bs=8)}},
               tmp_path / "lit.ckpt")
    written = convert(tmp_path / "lit.ckpt", tmp_path / "o", grid=(4, 4), head_dim=16)
    back = FactorizedAR.from_checkpoint(written["ar"])
    assert all(torch.equal(v, ar.state_dict()[k]) for k, v in back.state_dict().items())
    source = load_meta(written["tokenizer"])["extra"]["source"]
    assert source["source"] == "file"
    assert source["sha256"] == hashlib.sha256((tmp_path / "lit.ckpt").read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="no such file: .* is a directory"):
        convert(tmp_path, tmp_path / "o2", grid=(4, 4), head_dim=16)
