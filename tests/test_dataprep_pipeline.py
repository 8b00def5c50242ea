"""The Ray job end to end on CPU with an embedded, tightly capped Ray: image folder (real photos plus one
file of each awkward kind) -> Lance + MDS -> readers give exactly the tokens the tokenizer computes
in-process; a run killed mid-commit and resumed equals the uninterrupted one; rerunning is a no-op."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from dataprep import encode, images, manifest, samples  # noqa: E402
from dataprep import inspect as dp_inspect  # noqa: E402
from dataprep.reader import TokenDataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RES, BATCH, CHUNK, VIEWS = 32, 3, 8, "center,flip"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("dataprep")
    data = tmp / "data"
    samples.image_folder(data, classes=3, per_class=4)
    bad = samples.bad_files(data / "train" / "class_03")
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp / "ckpt")
    ray.init(address="local", num_cpus=2, object_store_memory=100 << 20, include_dashboard=False,
             configure_logging=False)
    try:
        yield {"tmp": tmp, "data": data, "ckpt": tmp / "ckpt", "bad": bad}
    finally:
        ray.shutdown()


def _args(w, out):
    return ["--data", str(w["data"]), "--split", "train", "--tokenizer", str(w["ckpt"]), "--out", str(out),
            "--resolution", str(RES), "--views", VIEWS, "--batch-size", str(BATCH), "--chunk-size", str(CHUNK),
            "--actors", "1"]


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["tmp"] / "full"
    assert encode.main(_args(world, out)) == 0
    return out


def _reference(world):
    """Tokens computed in-process: same crops, same batch composition (groups of BATCH within a chunk)."""
    from stage1_tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(world["ckpt"])
    listing = manifest.scan_folder(world["data"], "train")
    views = images.expand_views(VIEWS)
    ref, failed = {}, {}
    for lo, hi in manifest.chunk_ranges(len(listing.items), CHUNK):
        for group in manifest.groups(listing.items[lo:hi], BATCH):
            ok, crops = [], []
            for it in group:
                try:
                    crops.append(images.load_views(world["data"] / it.path, RES, views))
                    ok.append(it)
                except images.BadImage as e:
                    failed[it.path] = str(e)
            if not ok:
                continue
            t = tok.encode(images.to_model_input(np.concatenate(crops))).reshape(len(ok) * len(views), 16, 16)
            for i, it in enumerate(ok):
                for v in range(len(views)):
                    ref[manifest.row_id("train", it.index, v)] = (it.label, it.path, t[i * len(views) + v].numpy())
    return ref, failed


def test_round_trip_tokens_equal_in_process_encoding(world, uninterrupted, tmp_path):
    ref, failed = _reference(world)
    ds = TokenDataset(uninterrupted)
    m = ds.manifest
    assert m["classes"] == ["class_00", "class_01", "class_02", "class_03"] and m["num_classes"] == 4
    assert m["grid"] == [16, 16] and m["tokens_per_image"] == 256 and m["subtoken_bits"] == [6, 12]
    assert m["tokenizer"]["preset"] == "tokenizer-tiny" and len(m["tokenizer"]["checkpoint_sha256"]) == 64
    n_bad = sum(1 for v in world["bad"].values() if v != "ok")
    assert m["failures"] == n_bad == len(failed)
    c = m["counts"]["train"]
    assert c["images"] == 12 + len(world["bad"]) and c["encoded_images"] == c["images"] - n_bad
    assert c["rows"] == 2 * c["encoded_images"] == len(ref)
    assert c["per_class"] == {"0": 4, "1": 4, "2": 4, "3": len(world["bad"]) - n_bad}

    lance_rows = ds.read_lance(split="train")
    assert lance_rows["id"] == sorted(ref)
    for i, rid in enumerate(lance_rows["id"]):
        label, path, tokens = ref[rid]
        assert (lance_rows["label"][i], lance_rows["path"][i]) == (label, path)
        assert lance_rows["view"][i] == int(rid[-1])
        np.testing.assert_array_equal(lance_rows["tokens"][i], tokens, err_msg=rid)
    mds = ds.read_mds("train", tmp_path / "cache")
    assert mds["id"] == lance_rows["id"] and mds["label"] == lance_rows["label"]
    np.testing.assert_array_equal(mds["tokens"], lance_rows["tokens"])
    # failures table: every bad file with its reason
    lines = (uninterrupted / "failures-train.tsv").read_text().splitlines()[1:]
    got = {p: r for _, p, r in (ln.split("\t") for ln in lines)}
    assert got == failed
    for name, outcome in world["bad"].items():
        if outcome != "ok":
            assert got[f"train/class_03/{name}"].startswith(outcome)
    # Lance queries: filter by class, take by id
    assert len(ds.read_lance(filter="label = 1")["id"]) == 8
    one = ds.take([lance_rows["id"][5]])
    np.testing.assert_array_equal(one["tokens"][0], lance_rows["tokens"][5])
    # inspect: counts, usage, sizes, provenance, decoded grid
    info = dp_inspect.summarize(ds)
    assert info["lance_rows"] == len(ref) and info["provenance"]["lance_schema_matches_manifest"]
    assert 0 < info["codebook_usage"]["distinct_tokens"] <= len(ref) * 256
    assert dp_inspect.main([str(uninterrupted), "--grid", str(tmp_path / "g.png"), "--rows", "4"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 2 * RES


def test_kill_and_resume_equals_uninterrupted(world, uninterrupted, tmp_path, capsys):
    out = tmp_path / "resumed"
    env = {**os.environ, encode.CRASH_ENV: "2:lance", "PYTHONPATH": str(REPO)}
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, str(REPO / "dataprep" / "encode.py"), *_args(world, out),
                           "--address", address], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    st = json.loads((out / "state.json").read_text())
    assert list(st["splits"]["train"]["chunks"]) == ["0"]  # chunk 1 reached MDS + Lance, not the record
    assert (out / "mds" / "train" / "chunk-00001").is_dir()
    assert not (out / "manifest.json").exists()

    assert encode.main(_args(world, out)) == 0
    a, b = TokenDataset(uninterrupted), TokenDataset(out)
    ra, rb = a.read_lance(), b.read_lance()
    assert ra["id"] == rb["id"] and ra["path"] == rb["path"] and ra["label"] == rb["label"]
    np.testing.assert_array_equal(ra["tokens"], rb["tokens"])
    assert len(set(rb["id"])) == len(rb["id"])
    ma, mb = a.read_mds("train", tmp_path / "ca"), b.read_mds("train", tmp_path / "cb")
    assert ma["id"] == mb["id"]
    np.testing.assert_array_equal(ma["tokens"], mb["tokens"])
    assert a.manifest["counts"] == b.manifest["counts"]
    assert (uninterrupted / "failures-train.tsv").read_text() == (out / "failures-train.tsv").read_text()
    assert sorted(p.name for p in (out / "mds" / "train").iterdir()) == \
        sorted(p.name for p in (uninterrupted / "mds" / "train").iterdir())

    capsys.readouterr()
    assert encode.main(_args(world, out)) == 0  # finished: a no-op that says so
    assert "nothing to do" in capsys.readouterr().out
    assert TokenDataset(out).read_lance()["id"] == rb["id"]


def test_tencrop_views_through_ray_from_a_file_list(world, tmp_path):
    """LlamaGen's ten-crop through the Ray job, images given as a file list: every (image, view) row holds
    exactly the tokens of the same ten crops encoded in-process in one batch."""
    from stage1_tokenizer.tokenizer import Tokenizer

    paths = [f"train/class_0{c}/{p.name}" for c in range(2)
             for p in sorted((world["data"] / "train" / f"class_0{c}").iterdir())[:2]]
    flist = tmp_path / "list.tsv"
    flist.write_text("".join(f"{p}\t{i // 2}\n" for i, p in enumerate(paths)))
    out = tmp_path / "ten"
    assert encode.main(["--data", str(world["data"]), "--file-list", str(flist), "--split", "train",
                        "--tokenizer", str(world["ckpt"]), "--out", str(out), "--resolution", str(RES),
                        "--views", "tencrop", "--batch-size", "4", "--chunk-size", "4", "--actors", "1"]) == 0
    views = images.expand_views("tencrop")
    assert len(views) == 10
    tok = Tokenizer.from_checkpoint(world["ckpt"])
    crops = np.concatenate([images.load_views(world["data"] / p, RES, views) for p in sorted(paths)])
    expect = tok.encode(images.to_model_input(crops)).reshape(len(paths), 10, 16, 16).numpy()
    rows = TokenDataset(out).read_lance(split="train")
    assert len(rows["id"]) == 10 * len(paths)
    for i, p in enumerate(sorted(paths)):
        assert [rows["view"][j] for j in range(len(rows["id"])) if rows["path"][j] == p] == list(range(10))
        for j in range(len(rows["id"])):
            if rows["path"][j] == p:
                assert rows["label"][j] == paths.index(p) // 2
                np.testing.assert_array_equal(rows["tokens"][j], expect[i, rows["view"][j]])
    # the ten crops really differ (corners vs centre vs mirrors), so the check above is not vacuous
    assert len({c.tobytes() for c in crops[:10]}) == 10
