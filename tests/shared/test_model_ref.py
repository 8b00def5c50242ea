"""Model references (shared.model_ref): local directories, official files and hf:// references, offline.

The Hub is played by tests/support/hub_server.py on 127.0.0.1 through HF_ENDPOINT (download, revision pin, file
listing, a missing file or revision, a wrong token: 401, a forbidden repository: 403), and by a Hugging Face
cache the test builds itself under HF_HUB_OFFLINE=1. Hub resolutions run in a fresh interpreter, so
huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE / HF_TOKEN from the environment as for a user.
"""
import hashlib
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

from shared import model_ref
from shared.checkpoint import load_meta
from stage1_tokenizer import convert_official as tok_convert
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_ar import convert_official as ar_convert
from stage2_ar.model import FactorizedAR
from support.model_refs import file_sha256 as _sha
from support.model_refs import private_cache  # noqa: F401 (autouse: a private conversion cache per test)

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "official" / "golden"
AR_GEOMETRY = {"grid": (4, 4), "head_dim": 16}  # the golden AR file is not a released architecture
pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _copy(name, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(GOLDEN / name, where / name))


# --------------------------------------------------------------------------------------- parsing


def test_hub_references_parse():
    p = model_ref.parse_hub_ref
    assert p("hf://TencentARC/Open-MAGVIT2-AR-B-256-resolution") == model_ref.HubRef(
        "TencentARC/Open-MAGVIT2-AR-B-256-resolution")
    assert p("hf://org/repo/sub/dir/w.ckpt@v1.0") == model_ref.HubRef("org/repo", "sub/dir/w.ckpt", "v1.0")
    assert p("hf://org/repo@refs/pr/3") == model_ref.HubRef("org/repo", None, "refs/pr/3")
    assert str(p("hf://org/repo/w.ckpt@abc")) == "hf://org/repo/w.ckpt@abc"
    for bad in ("hf://", "hf://org", "hf://org/", "hf://org//x.ckpt", "hf://org/repo@", "hf://org/../x"):
        with pytest.raises(model_ref.ModelRefError, match="malformed Hub reference"):
            p(bad)
    with pytest.raises(model_ref.ModelRefError, match="unsupported reference"):
        model_ref.locate("s3://bucket/tok")
    with pytest.raises(model_ref.ModelRefError, match="no such file or directory"):
        model_ref.locate("/nonexistent/tok")


# --------------------------------------------------------------------------------------- local references


def test_local_official_file_converts_once_and_equals_the_converter(tmp_path, private_cache, monkeypatch):
    ckpt = _copy("tokenizer_tiny.ckpt", tmp_path / "official")
    tok_convert.main([str(ckpt), str(tmp_path / "converted")])
    want = Tokenizer.from_checkpoint(tmp_path / "converted")
    tok = Tokenizer.from_pretrained(ckpt)
    assert _digest(tok) == _digest(want)
    rec = tok.provenance
    assert rec["source"] == "file" and rec["sha256"] == _sha(ckpt) and rec["converted"] is True
    assert Path(rec["checkpoint"]) == ckpt.parent / "tokenizer_tiny.ckpt.converted" / _sha(ckpt) / "tokenizer"
    assert load_meta(rec["checkpoint"])["extra"]["source"]["sha256"] == _sha(ckpt)
    # cached: a second resolution converts nothing; a directory reference is taken as it is
    monkeypatch.setattr(tok_convert, "load_official", lambda *a, **k: pytest.fail("converted twice"))
    assert _digest(Tokenizer.from_pretrained(ckpt)) == _digest(want)
    same = Tokenizer.from_pretrained(tmp_path / "converted")
    assert same.provenance["source"] == "directory" and same.provenance["converted"] is False
    assert same.provenance["sha256"] == _sha(tmp_path / "converted" / "model.safetensors")
    assert not private_cache.joinpath("converted").exists()


def test_not_writable_beside_the_file_goes_to_the_cache(tmp_path, private_cache, monkeypatch):
    ckpt = _copy("tokenizer_tiny.ckpt", tmp_path / "ro")
    beside = model_ref.conversion_dirs(model_ref.locate(ckpt))[0]
    real = model_ref._writable
    monkeypatch.setattr(model_ref, "_writable", lambda d: d != beside and real(d))  # root ignores permissions
    tok = Tokenizer.from_pretrained(ckpt, weights="raw")
    assert Path(tok.provenance["checkpoint"]) == private_cache / "converted" / _sha(ckpt) / "tokenizer-raw"
    assert not beside.exists()
    assert load_meta(tok.provenance["checkpoint"])["extra"]["weights"] == "raw"


def test_ar_file_gives_both_halves_and_converter_outputs_are_references(tmp_path):
    ckpt = _copy("ar_tiny.ckpt", tmp_path / "official")
    ar_convert.main([str(ckpt), str(tmp_path / "out"), "--grid", "4,4", "--head-dim", "16"])
    ar = FactorizedAR.from_pretrained(ckpt, **AR_GEOMETRY)
    assert _digest(ar) == _digest(FactorizedAR.from_checkpoint(tmp_path / "out" / "ar"))
    tok = Tokenizer.from_pretrained(ckpt)  # the AR file's tokenizer half (raw weights), found in the cache
    assert _digest(tok) == _digest(Tokenizer.from_checkpoint(tmp_path / "out" / "tokenizer"))
    assert tok.provenance["checkpoint"] == str(Path(ar.provenance["checkpoint"]).parent / "tokenizer")
    # the converter's OUT (ar/ + tokenizer/) is a reference for both models
    assert Path(FactorizedAR.from_pretrained(tmp_path / "out").provenance["checkpoint"]) == tmp_path / "out" / "ar"
    assert Path(Tokenizer.from_pretrained(tmp_path / "out").provenance["checkpoint"]) == tmp_path / "out" / "tokenizer"
    with pytest.raises(Exception, match="pass --grid H,W and --head-dim D"):
        FactorizedAR.from_pretrained(ckpt)  # an unreleased architecture needs its geometry


def test_stage1_evaluate_takes_a_reference(tmp_path, photos, monkeypatch, capsys):
    from stage1_tokenizer import evaluate

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    ckpt = _copy("tokenizer_tiny.ckpt", tmp_path / "official")
    res = evaluate.main(["--tokenizer", str(ckpt), "--data", str(photos), "--resolution", "16", "--limit", "2",
                         "--workers", "0", "--device", "cpu"])
    assert res["images"] == 2 and res["config"]["tokenizer_source"]["sha256"] == _sha(ckpt)


# --------------------------------------------------------------------------------------- the README table


def test_readme_release_table_matches_the_code():
    """Every official release row: its hub reference, our preset and that preset's parameter count."""
    from stage1_tokenizer.config import PRESETS as TOK
    from stage2_ar.config import PRESETS as AR
    from stage2_ar.model import count_params

    def tok_params(name):
        with torch.device("meta"):
            return sum(p.numel() for p in Tokenizer(TOK[name]).parameters())

    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (.+?) \| `(hf://[^`]+)` \| `([\w-]+)` \| ([\d,]+) \|", text, re.M)
    assert {ref for _, ref, _, _ in rows} == {f"hf://{r}" for r in model_ref.OFFICIAL_RELEASES}
    for _, ref, preset, count in rows:
        n = tok_params(preset) if preset in TOK else count_params(AR[preset])
        assert f"{n:,}" == count, (ref, preset, n)
        assert model_ref.OFFICIAL_RELEASES[ref[len("hf://"):]]  # the released file name is known


# --------------------------------------------------------------------------------------- the Hub, offline


def _driver(jobs):
    """Run in a fresh interpreter: resolve each job, report the provenance and a digest of the weights."""
    out = []
    for job in jobs:
        for k, v in job.get("env", {}).items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        try:
            if job["what"] == "cli":
                tok_convert.main([job["ref"], job["out"]])
                out.append({"ok": True, "digest": _digest(Tokenizer.from_checkpoint(job["out"]))})
                continue
            cls = FactorizedAR if job["what"] == "ar" else Tokenizer
            model = cls.from_pretrained(job["ref"], **({"grid": (4, 4), "head_dim": 16} if job["what"] == "ar" else {}))
            out.append({"ok": True, "record": model.provenance, "digest": _digest(model)})
        except SystemExit as e:
            out.append({"ok": False, "error": str(e.code)})
        except Exception as e:  # the test checks the type and the one-line message
            out.append({"ok": False, "error": str(e), "type": type(e).__name__})
    print("RESULT" + json.dumps(out))


def _resolve_in_subprocess(jobs, env):
    code = "import json, sys, test_model_ref as t; t._driver(json.loads(sys.argv[1]))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    path = os.pathsep.join(map(str, (REPO, REPO / "tests", Path(__file__).resolve().parent)))  # this file's folder
    r = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**clean, "PYTHONPATH": path,
                                         "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", **env})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.split("RESULT", 1)[1])
    for res in results:
        if not res["ok"]:
            assert "\n" not in res["error"] and "Traceback" not in res["error"], res
    return results


def _lightning_variant(src: Path, dst: Path) -> Path:
    """The golden tokenizer file, weights scaled, saved as a Lightning file with extras: another version."""
    sd = torch.load(src, weights_only=True)["state_dict"]
    sd = {k: v * 1.01 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"lr": np.float64(1e-4)}, "epoch": 9}, dst)
    return dst


def _expected_digest(path: Path, what="tok") -> str:
    """The digest of the model converted from the local file (what the Hub download must give)."""
    if what == "ar":
        return _digest(FactorizedAR.from_pretrained(path, **AR_GEOMETRY))
    return _digest(Tokenizer.from_pretrained(path))


def test_hub_download_revision_listing_and_errors_then_offline(tmp_path):
    from support.hub_server import HubServer

    v1 = _copy("tokenizer_tiny.ckpt", tmp_path / "files")
    v2 = _lightning_variant(v1, tmp_path / "files" / "v2.ckpt")
    ar = _copy("ar_tiny.ckpt", tmp_path / "files")
    want = {"v1": _expected_digest(v1), "v2": _expected_digest(v2), "ar": _expected_digest(ar, "ar")}
    hf_home = tmp_path / "hf-home"
    env = {"HF_HOME": str(hf_home), model_ref.CACHE_ENV: str(tmp_path / "om2-hub-cache")}
    with HubServer() as hub:
        c1 = hub.commit("test-org/tiny-tok", {"tok.ckpt": v1.read_bytes(), "README.md": b"# tiny\n"})
        c2 = hub.commit("test-org/tiny-tok", {"tok.ckpt": v2.read_bytes(), "README.md": b"# tiny\n"})
        hub.commit("test-org/two", {"a.ckpt": v1.read_bytes(), "b.ckpt": v1.read_bytes()})
        hub.commit("test-org/private", {"tok.ckpt": v1.read_bytes()}, token="right-token")
        hub.commit("test-org/forbidden", {"tok.ckpt": v1.read_bytes()}, forbidden=True)
        hub.commit("test-org/tiny-ar", {"AR_tiny.ckpt": ar.read_bytes()})
        out = str(tmp_path / "cli-out")
        jobs = [
            {"what": "tok", "ref": "hf://test-org/tiny-tok"},  # no FILE: the single .ckpt (listed by the API)
            {"what": "tok", "ref": f"hf://test-org/tiny-tok/tok.ckpt@{c1}"},  # pinned to the first commit
            {"what": "tok", "ref": "hf://test-org/tiny-tok/nope.ckpt"},
            {"what": "tok", "ref": "hf://test-org/tiny-tok@no-such-branch"},
            {"what": "tok", "ref": "hf://test-org/two"},
            {"what": "tok", "ref": "hf://test-org/absent/tok.ckpt"},
            {"what": "tok", "ref": "hf://test-org/private/tok.ckpt", "env": {"HF_TOKEN": "wrong-token"}},
            {"what": "cli", "ref": "hf://test-org/private/tok.ckpt", "out": out},
            {"what": "tok", "ref": "hf://test-org/private/tok.ckpt", "env": {"HF_TOKEN": "right-token"}},
            {"what": "tok", "ref": "hf://test-org/forbidden/tok.ckpt", "env": {"HF_TOKEN": None}},
            {"what": "ar", "ref": "hf://test-org/tiny-ar"},
            {"what": "tok", "ref": "hf://test-org/tiny-ar"},  # the AR file's tokenizer half
            {"what": "cli", "ref": f"hf://test-org/tiny-tok@{c1}", "out": out},
        ]
        r = _resolve_in_subprocess(jobs, {**env, "HF_ENDPOINT": hub.url})
        assert r[0]["ok"] and r[0]["digest"] == want["v2"]
        rec = r[0]["record"]
        assert (rec["repo"], rec["file"], rec["revision"], rec["commit"]) == ("test-org/tiny-tok", "tok.ckpt", None, c2)
        assert rec["sha256"] == _sha(v2) and rec["source"] == "hub" and rec["converted"]
        assert r[1]["ok"] and r[1]["digest"] == want["v1"] and r[1]["record"]["commit"] == c1
        assert r[1]["record"]["revision"] == c1 and r[1]["record"]["sha256"] == _sha(v1)
        assert "no file 'nope.ckpt' in test-org/tiny-tok" in r[2]["error"]
        assert "revision 'no-such-branch' not found" in r[3]["error"]
        assert "2 .ckpt files (a.ckpt, b.ckpt); name the file" in r[4]["error"]
        assert "repository test-org/absent not found" in r[5]["error"]
        assert "authentication failed (HTTP 401)" in r[6]["error"] and "HF_TOKEN is set" in r[6]["error"]
        assert r[7]["error"].startswith("error: ") and "HTTP 401" in r[7]["error"]  # the converter CLI, one line
        assert r[8]["ok"] and r[8]["digest"] == want["v1"]
        assert "access denied (HTTP 403)" in r[9]["error"]
        assert r[10]["ok"] and r[10]["digest"] == want["ar"] and r[10]["record"]["file"] == "AR_tiny.ckpt"
        assert r[11]["ok"] and r[11]["record"]["checkpoint"].endswith("/tokenizer")
        assert r[12]["ok"] and r[12]["digest"] == want["v1"]
        assert load_meta(out)["extra"]["source"]["commit"] == c1
        assert any(a == "Bearer right-token" for _, _, a in hub.requests)
        n_requests = len(hub.requests)

        # offline: what was downloaded is found in the cache, nothing is asked; the rest is a one-line error
        _build_official_cache(hf_home / "hub", v1)
        jobs = [
            {"what": "tok", "ref": "hf://test-org/tiny-tok"},  # listed from the cached snapshot of main
            {"what": "tok", "ref": f"hf://test-org/tiny-tok/tok.ckpt@{c1}"},
            {"what": "tok", "ref": "hf://test-org/never-fetched/tok.ckpt"},
            {"what": "tok", "ref": "hf://test-org/never-fetched"},
            {"what": "tok", "ref": "hf://TencentARC/Open-MAGVIT2-Tokenizer-128-resolution"},  # a cache built here
        ]
        r = _resolve_in_subprocess(jobs, {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"})
        assert len(hub.requests) == n_requests
    assert r[0]["ok"] and r[0]["digest"] == want["v2"] and r[0]["record"]["commit"] == c2
    assert r[1]["ok"] and r[1]["digest"] == want["v1"]
    assert "not in the Hugging Face cache" in r[2]["error"] and "HF_HUB_OFFLINE=1" in r[2]["error"]
    assert "offline" in r[3]["error"] and "name the file" in r[3]["error"]
    rec = r[4]["record"]
    assert r[4]["ok"] and r[4]["digest"] == want["v1"] and rec["file"] == "imagenet_128_L.ckpt"
    assert rec["commit"] == OFFICIAL_COMMIT and rec["sha256"] == _sha(v1)


OFFICIAL_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _build_official_cache(hub_cache: Path, stand_in: Path) -> None:
    """The Hugging Face cache layout of one official release, holding a tiny stand-in under the released name:
    models--ORG--REPO/{refs/main, blobs/<sha256>, snapshots/<commit>/<file> -> the blob}."""
    repo = "TencentARC/Open-MAGVIT2-Tokenizer-128-resolution"
    storage = hub_cache / ("models--" + repo.replace("/", "--"))
    blob = storage / "blobs" / _sha(stand_in)
    blob.parent.mkdir(parents=True)
    shutil.copy(stand_in, blob)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(OFFICIAL_COMMIT)
    snap = storage / "snapshots" / OFFICIAL_COMMIT
    snap.mkdir(parents=True)
    (snap / model_ref.OFFICIAL_RELEASES[repo]).symlink_to(os.path.relpath(blob, snap))
