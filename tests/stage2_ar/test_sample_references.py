"""Model references (``shared.model_ref``) in the tools that take models: ``stage2_ar.sample`` / ``evaluate``
(``--ckpt REF``, ``--tokenizer REF``, defaulting to the AR reference's tokenizer half) and ``dataprep.encode``
(``--tokenizer REF``), with what each reference resolved to recorded next to what they make.

The documented command, ``python -m stage2_ar.sample --ckpt hf://TencentARC/Open-MAGVIT2-AR-B-256-resolution
...``, runs as a real process against the Hub stand-in (tests/support/hub_server.py, through HF_ENDPOINT), which
serves a tiny official-layout AR file (the golden ``ar_tiny.ckpt``, its transformer and its tokenizer half,
with the official RoPE table stored so that its geometry needs no flags) under the released repository and
file names.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from shared import inception, model_ref
from shared.checkpoint import load_meta
from stage2_ar import convert_official as ar_convert
from stage2_ar import evaluate, sample
from stage2_ar.samples_npz import write_samples
from support.model_refs import file_sha256 as _sha
from support.model_refs import private_cache  # noqa: F401 (autouse: a private conversion cache per test)

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "official" / "golden"
AR_REPO = "TencentARC/Open-MAGVIT2-AR-B-256-resolution"

pytestmark = pytest.mark.usefixtures("one_thread")


def official_ar_file(path: Path) -> Path:
    """The golden official AR file with its RoPE table (``GPT.freqs_cis``, as the official code computed it)
    stored: a file whose grid and head count are read from it, as a released one's are known."""
    official = torch.load(GOLDEN / "ar_tiny.ckpt", map_location="cpu", weights_only=True)
    rope = load_file(GOLDEN / "ar_tiny.outputs.safetensors")["rope.freqs_cis"]
    official["state_dict"]["transformer.freqs_cis"] = rope
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official, path)
    return path


def _provenance(grid: Path) -> dict:
    return json.loads(Image.open(grid).text[sample.PROVENANCE_KEY])


SAMPLING = ["--classes", "3,7", "--per-class", "2", "--cfg", "1.9,2.0", "--top-k", "1,1", "--npz"]


def test_the_documented_hub_command_samples_and_records_its_models(tmp_path):
    from support.hub_server import HubServer

    ckpt = official_ar_file(tmp_path / "files" / model_ref.OFFICIAL_RELEASES[AR_REPO])
    # what the same file gives through a local conversion (the converter's OUT holds ar/ and tokenizer/)
    assert ar_convert.main([str(ckpt), str(tmp_path / "local")]) == 0
    assert sample.main(["--ckpt", str(tmp_path / "local"), *SAMPLING, "--out", str(tmp_path / "want")]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(tmp_path / "hf-home"), model_ref.CACHE_ENV: str(tmp_path / "hub-cache"),
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore"})
    with HubServer() as hub:
        commit = hub.commit(AR_REPO, {ckpt.name: ckpt.read_bytes(), "README.md": b"# AR-B\n"})
        env["HF_ENDPOINT"] = hub.url
        out = tmp_path / "samples"
        r = subprocess.run([sys.executable, "-m", "stage2_ar.sample", "--ckpt", f"hf://{AR_REPO}", *SAMPLING,
                            "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert any(path.endswith(ckpt.name) for _, path, _ in hub.requests)
    with np.load(out / "samples.npz") as got, np.load(tmp_path / "want" / "samples.npz") as want:
        assert np.array_equal(got["arr_0"], want["arr_0"]) and got["arr_1"].tolist() == [3, 3, 7, 7]
    rec = _provenance(out / "grid.png")
    assert rec["ckpt"] == rec["tokenizer"] == f"hf://{AR_REPO}"
    ar, tok = rec["ckpt_source"], rec["tokenizer_source"]
    for src in (ar, tok):  # both halves of the one released file, downloaded once
        assert (src["source"], src["repo"], src["file"], src["commit"]) == ("hub", AR_REPO, ckpt.name, commit)
        assert src["sha256"] == _sha(ckpt) and src["converted"] is True
    assert Path(tok["checkpoint"]) == Path(ar["checkpoint"]).parent / "tokenizer"
    assert load_meta(tok["checkpoint"])["extra"]["weights"] == "raw"  # the AR file's half: the raw set
    assert (rec["cfg_scales"], rec["top_k"], rec["seed"]) == ([1.9, 2.0], [1, 1], 0)
    local = _provenance(tmp_path / "want" / "grid.png")["ckpt_source"]
    assert local["source"] == "directory" and Path(local["checkpoint"]) == tmp_path / "local" / "ar"


def test_evaluate_takes_an_official_file_and_records_both_models(tmp_path, monkeypatch):
    from support.tiny_features import tiny_features

    ckpt = official_ar_file(tmp_path / "official" / "AR_tiny.ckpt")
    monkeypatch.setattr(inception, "load_inception", lambda weights=None, device="cpu": tiny_features())
    write_samples(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    assert evaluate.main(["--ckpt", str(ckpt), "--classes", "1,2", "--per-class", "2", "--top-p", "0.9,1",
                          "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    settings = json.loads((tmp_path / "e" / "metrics.json").read_text())["settings"]
    assert settings["ckpt"] == settings["tokenizer"] == str(ckpt)
    for key in ("ckpt_source", "tokenizer_source"):
        assert settings[key]["source"] == "file" and settings[key]["sha256"] == _sha(ckpt)
    assert settings["top_p"] == [0.9, 1.0] and settings["top_k"] == [0, 0] and len(settings["cfg_scales"]) == 2


def test_missing_tokenizer_and_missing_references_are_one_line(tmp_path, tiny_checkpoints):
    ar, tok = tiny_checkpoints
    base = ["--classes", "0", "--out", str(tmp_path / "o")]
    cases = [(["--ckpt", str(ar)],
              r"no --tokenizer given: looked for the tokenizer of --ckpt .*--tokenizer REF"),
             (["--ckpt", str(tmp_path / "nope")], r"--ckpt .*nope is not a directory or a file"),
             (["--ckpt", str(ar), "--tokenizer", "hf://org"], r"--tokenizer malformed Hub reference"),
             (["--ckpt", "s3://bucket/ar"], r"--ckpt s3://bucket/ar is not a directory or a file")]
    for flags, msg in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(flags + base)
        text = str(e.value.code)
        assert text.startswith("error: ") and "\n" not in text, text
        assert re.search(msg, text), text
    assert sample.main(["--ckpt", str(ar), "--tokenizer", str(tok), *base]) == 0


def test_missing_evaluation_assets_name_the_asset_and_its_source(tmp_path, monkeypatch):
    from stage1_tokenizer import losses
    from stage2_ar import gen_metrics

    write_samples(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.setattr(inception, "load_inception", lambda weights=None, device="cpu": None)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "VIRTUAL_imagenet256_labeled.npz"),
                       "--out", str(tmp_path / "e")])
    msg = str(e.value.code)
    assert msg.startswith("error: reference batch ") and "\n" not in msg
    assert gen_metrics.ADM_REFERENCE_FILE in msg and gen_metrics.ADM_REFERENCE_URL in msg
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for net in ("vgg", "alex"):
        for given in (None, tmp_path / "absent.pth"):
            with pytest.raises(losses.LPIPSWeightsMissing) as e:
                losses.find_trunk_weights(net, given)
            assert losses.TRUNK_FILES[net] in str(e.value) and losses.TRUNK_URLS[net] in str(e.value)
    # the sources the messages give are the ones docs/evaluation-assets.md lists
    assets = (REPO / "docs" / "evaluation-assets.md").read_text()
    assert gen_metrics.ADM_REFERENCE_URL in assets and all(url in assets for url in losses.TRUNK_URLS.values())


# ---------------------------------------------------------------------------------------------- dataprep


def test_encode_resolves_an_official_tokenizer_before_the_job_and_records_it(tmp_path):
    from dataprep import encode
    from shared.token_dataset.manifest import Manifest, SplitCounts

    ckpt = Path(shutil.copy(GOLDEN / "tokenizer_tiny.ckpt", tmp_path / "tokenizer_tiny.ckpt"))
    for weights in (None, "ema"):
        args = ["--data", str(tmp_path), "--tokenizer", str(ckpt), "--out", str(tmp_path / "ds")]
        ns = encode.parse_args(args + (["--tokenizer-weights", weights] if weights else []))
        path, source = encode.pick_tokenizer(ns)
        want = weights or "raw"  # an official file gives its raw set unless told: what AR tokens are made with
        assert path.is_dir() and load_meta(path)["extra"]["weights"] == want
        assert Path(source["checkpoint"]) == path and source["ref"] == str(ckpt)
        assert (source["source"], source["sha256"], source["converted"]) == ("file", _sha(ckpt), True)
        tok = encode.load_tokenizer(path, ns.tokenizer_weights, source)
        assert tok["source"] == source and tok["weights"] == want
    # the manifest takes the block (and refuses a source that is not a record)
    counts = {"train": SplitCounts(images=1, encoded_images=1, failed_images=0, rows=1, per_class={"0": 1},
                                   complete=True)}
    fields = dict(grid=(2, 2), bits_per_token=18, subtoken_bits=(6, 12), classes=("a",), resolution=8,
                  views=("center",), counts=counts)
    assert Manifest(tokenizer=tok, **fields).tokenizer["source"]["sha256"] == _sha(ckpt)
    with pytest.raises(Exception, match="tokenizer.source must be an object"):
        Manifest(tokenizer={**tok, "source": "hf://x/y"}, **fields)
    # a directory is recorded as such (the sha256 of its weights); a file that is no official checkpoint is
    # refused in one line
    ns = encode.parse_args(["--data", str(tmp_path), "--tokenizer", str(path), "--out", str(tmp_path / "ds")])
    _, source = encode.pick_tokenizer(ns)
    assert source["source"] == "directory" and source["converted"] is False
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    ns = encode.parse_args(["--data", str(tmp_path), "--tokenizer", str(tmp_path / "junk.ckpt"), "--out", "x"])
    with pytest.raises(SystemExit, match=r"error: --tokenizer .*junk.ckpt is not a checkpoint directory, nor an "
                                         r"official file: "):
        encode.pick_tokenizer(ns)
