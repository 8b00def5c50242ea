"""The Ray job over every source: the same images as a folder, as Parquet files and as WebDataset tars, on
local disk and on S3 (the suite's moto server), encode to the same ids, labels and tokens; a run killed
mid-commit in each S3 format and resumed by the same command equals the uninterrupted local run; bad records
and shards are failures, not crashes; a source that changed under a started split is refused in one line."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ray

from dataprep import encode, inspect_dataset
from support.s3_server import BUCKET, moto_server
from shared import object_store
from shared.token_dataset import TokenDataset
from support.source_shards import shard_sources, source_folder, upload_sources

REPO = Path(__file__).resolve().parents[2]
COMMON = 13  # the folder's images (12 photos and a truncated JPEG), first in every source
FORMATS = ("folder", "parquet", "webdataset")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Sources on disk and in the S3 server, a tiny tokenizer, and a Ray instance whose workers have the AWS
    credentials (as a cluster's nodes do: the read tasks use them)."""
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("sources-job")
    folder = source_folder(tmp / "folder")
    local = {"folder": str(folder), **shard_sources(folder, tmp)}
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp / "ckpt", extra={"weights": "raw"})
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                             "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "S3_ENDPOINT_URL")}
    with moto_server() as s3:
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update({**s3.env(), "S3_ENDPOINT_URL": s3.url})
        base = f"s3://{BUCKET}/src"
        upload_sources(base, {"folder": folder, "parquet": tmp / "parquet", "webdataset": tmp / "webdataset"})
        remote = {"folder": f"{base}/folder", "parquet": f"{base}/parquet/train-*.parquet",
                  "webdataset": f"{base}/webdataset/train-{{0000..0005}}.tar"}
        ray.init(address="local", num_cpus=2, object_store_memory=100 << 20, include_dashboard=False,
                 configure_logging=False)
        try:
            yield {"tmp": tmp, "local": local, "remote": remote, "s3": s3, "ckpt": tmp / "ckpt",
                   "classes": str(tmp / "webdataset" / "classes.txt")}
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _args(w, fmt, data, out):
    extra = {"parquet": ["--format", "parquet"], "webdataset": ["--class-names", w["classes"]]}.get(fmt, [])
    return ["--data", data, *extra, "--split", "train", "--tokenizer", str(w["ckpt"]), "--out", str(out),
            "--resolution", "16", "--views", "center,flip", "--batch-size", "2", "--chunk-size", "4", "--actors", "1"]


def _cli(w, args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, str(REPO / "dataprep" / "encode.py"), *args, "--address",
                           ray.get_runtime_context().gcs_address], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def _rows(out):
    """{id: (path, label, tokens)} of the Lance store; {id: tokens} of the MDS store."""
    ds = TokenDataset(out)
    r = ds.read_lance()
    lance = {i: (p, lbl, t) for i, p, lbl, t in zip(r["id"], r["path"], r["label"], r["tokens"])}
    return ds, lance


def _failures(out):
    return [ln.split("\t") for ln in (Path(out) / "failures-train.tsv").read_text().splitlines()[1:]]


@pytest.mark.slow
def test_every_source_encodes_the_same_and_resumes_exactly(world, tmp_path):
    outs = {}
    for fmt in FORMATS:  # uninterrupted, from local disk
        outs[("local", fmt)] = tmp_path / f"local-{fmt}"
        assert encode.main(_args(world, fmt, world["local"][fmt], outs[("local", fmt)])) == 0
    for fmt in FORMATS:  # from S3: killed inside the second commit (after its Lance append), then resumed
        out = outs[("s3", fmt)] = tmp_path / f"s3-{fmt}"
        args = _args(world, fmt, world["remote"][fmt], out)
        p = _cli(world, args + ["--_crash-at", "2:lance"])
        assert p.returncode == encode.CRASH_EXIT, p.stderr[-3000:]
        assert list(json.loads((out / "state.json").read_text())["splits"]["train"]["chunks"]) == ["0"]
        assert not (out / "manifest.json").exists()
        p = _cli(world, args)
        assert p.returncode == 0, p.stderr[-3000:]
        if fmt != "folder":  # the shard counts recorded by the killed run are not read again
            assert "as recorded by the earlier run" in p.stderr, p.stderr[-3000:]

    # 1. the same image gives the same id, label and tokens in every source
    ref_ds, ref = _rows(outs[("local", "folder")])
    assert len(ref) == 2 * (COMMON - 1)
    for key, out in outs.items():
        ds, rows = _rows(out)
        common = {i: v for i, v in rows.items() if int(i.split("-")[1]) < COMMON}
        assert sorted(common) == sorted(ref), key
        for i, (path, label, tokens) in ref.items():
            assert common[i][1] == label, (key, i)
            np.testing.assert_array_equal(common[i][2], tokens, err_msg=f"{key} {i}")
        assert ds.manifest.classes == ref_ds.manifest.classes
        broken = {"folder": "train/class_02/zz_broken.jpg", "parquet": "train-00002-of-00003.parquet#2",
                  "webdataset": "train-0002.tar#zz_broken"}[key[1]]  # image 12: index = position in the shards
        assert {f[1]: f[2] for f in _failures(out)}[broken].startswith("corrupt: image file is truncated"), key
    # 2. local and S3 copies of a format: the same dataset (rows, paths, MDS samples, failures, counts)
    for fmt in FORMATS:
        (a, ra), (b, rb) = _rows(outs[("local", fmt)]), _rows(outs[("s3", fmt)])
        assert ra.keys() == rb.keys()
        for i in ra:
            assert ra[i][:2] == rb[i][:2]
            np.testing.assert_array_equal(ra[i][2], rb[i][2])
        ma, mb = a.read_mds("train", tmp_path / f"ca-{fmt}"), b.read_mds("train", tmp_path / f"cb-{fmt}")
        assert ma["id"] == mb["id"]
        np.testing.assert_array_equal(ma["tokens"], mb["tokens"])
        assert _failures(outs[("local", fmt)]) == _failures(outs[("s3", fmt)])
        assert a.manifest.counts == b.manifest.counts
    # 3. the bad records of the shard sources, as failures
    reasons = {f[1]: f[2] for f in _failures(outs[("s3", "parquet")])}
    assert reasons["train-zz-bad-labels.parquet#1"] == "label 7 out of range 0..2"
    assert reasons["train-zz-truncated.parquet"].startswith("unreadable shard: ")
    reasons = {f[1]: f[2] for f in _failures(outs[("s3", "webdataset")])}
    assert reasons["train-0003.tar#a"] == "label missing (no .cls member)"
    assert reasons["train-0003.tar"].startswith("corrupt tar: no valid member header")
    assert reasons["train-0004.tar"].startswith("unreadable shard: ")
    assert reasons["train-0005.tar#f"] == "corrupt tar member: unexpected end of data"
    c = TokenDataset(outs[("s3", "webdataset")]).manifest.counts["train"]
    assert (c.images, c.encoded_images, c.failed_images) == (COMMON + 8, COMMON - 1 + 2, 7)
    # 4. the manifest records each source: URI, format, shards with size and ETag / mtime, class names' origin
    src = json.loads((outs[("s3", "parquet")] / "manifest.json").read_text())["sources"]["train"]
    assert src["uri"] == world["remote"]["parquet"] and src["format"] == "parquet"
    assert src["classes_from"].startswith("parquet metadata") and src["image_column"] == "image"
    assert [s["name"] for s in src["shards"]][:2] == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet"]
    assert all(s["etag"] and s["size"] > 0 for s in src["shards"])
    local = json.loads((outs[("local", "webdataset")] / "manifest.json").read_text())["sources"]["train"]
    assert local["format"] == "webdataset" and all(s["mtime_ns"] > 0 for s in local["shards"])
    assert local["records"] == COMMON + 8 and local["label_key"] == "cls"
    assert json.loads((outs[("s3", "folder")] / "manifest.json").read_text())["sources"]["train"]["objects"] == COMMON
    info = inspect_dataset.summarize(TokenDataset(outs[("s3", "parquet")]))
    assert info["provenance"]["sources"] == {"train": f"parquet {world['remote']['parquet']} (5 shards)"}

    # 5. a source that changed under the dataset: refused in one line, before anything is done
    key = f"{world['remote']['parquet'].rsplit('/', 1)[0]}/train-00001-of-00003.parquet"
    object_store.put_bytes(key, object_store.get_bytes(key) + b"\0")
    with pytest.raises(SystemExit) as e:
        encode.main(_args(world, "parquet", world["remote"]["parquet"], outs[("s3", "parquet")]))
    assert str(e.value.code).startswith("error: the source of split 'train' (s3://tokens/src/parquet/train-*.parquet) "
                                        "changed since it was started: train-00001-of-00003.parquet: size ")
    object_store.put_bytes(f"{world['remote']['folder']}/train/class_00/new.jpg", b"new")
    with pytest.raises(SystemExit, match=r"error: the source of split 'train' .* the images under it changed "
                                         r"\(13 -> 14 images"):
        encode.main(_args(world, "folder", world["remote"]["folder"], outs[("s3", "folder")]))


@pytest.mark.slow
def test_bad_s3_sources_are_one_line_before_ray(world, tmp_path):
    """The real command on bad S3 sources: one line, exit 1, nothing written, Ray never joined."""
    object_store.put_bytes(f"s3://{BUCKET}/notes/train/cls/readme.txt", b"no images here")
    cases = [
        (f"s3://{BUCKET}/notes", f"error: s3://{BUCKET}/notes/train/ holds no images \\(1 other objects\\)$"),
        (f"s3://{BUCKET}/nothing", f"error: s3://{BUCKET}/nothing/train/ holds no class folders"),
        (f"s3://{BUCKET}/src/webdataset/train-{{0000..0009}}.tar",
         f"error: s3://{BUCKET}/src/webdataset/train-0006.tar: no such object \\(one of the 10 shards"),
        ("s3://no-such-bucket/data/train-*.parquet", "error: s3://no-such-bucket/data/: bucket 'no-such-bucket' "
                                                     "does not exist$"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(REPO / "dataprep" / "encode.py"), "--data", data, "--num-classes",
                               "3", "--tokenizer", str(world["ckpt"]), "--out", str(tmp_path / f"out{k}"),
                               "--resolution", "16", "--address", "127.0.0.1:1"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (data, _) in enumerate(cases[2:], 2)]
    for k, (data, want) in enumerate(cases):
        if k < 2:  # folders take no --num-classes
            p = subprocess.run([sys.executable, str(REPO / "dataprep" / "encode.py"), "--data", data, "--tokenizer",
                                str(world["ckpt"]), "--out", str(tmp_path / f"out{k}"), "--resolution", "16",
                                "--address", "127.0.0.1:1"], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=300)
            err = p.stderr
        else:
            p = procs[k - 2]
            err = p.communicate(timeout=300)[1]
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and re.search(want, lines[0]), (data, err[-2000:])
        assert not (tmp_path / f"out{k}").exists()
