"""Token datasets on object storage, against a real S3 server (moto, a subprocess on 127.0.0.1, credentials
checked): publish (manifest last, resumable after a kill), the Ray job with an s3:// --out, readers
(TokenDataset: Lance queries, take, the MDS samples; inspect_dataset and --verify), Stage-2 training
streamed from S3 with a kill and an exact resume, no secret written anywhere, and the bad cases in one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dataprep import publish
from support.s3_server import BUCKET, moto_server
from shared import object_store
from shared.token_dataset import ManifestError, TokenDataset
from support.synthetic_tokens import write_tokens

REPO = Path(__file__).resolve().parents[2]
GRID, N, CLASSES = (4, 4), 48, 10


@pytest.fixture(scope="module")
def s3():
    with moto_server() as server:
        yield server


@pytest.fixture
def aws(s3, monkeypatch):
    """This process as a user with working credentials: the standard AWS environment variables."""
    for k in [k for k in os.environ if k.startswith("AWS_") or k == "S3_ENDPOINT_URL"]:
        monkeypatch.delenv(k)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3.url)
    return s3


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A two-split, two-view dataset on local disk (token 0 = image number, token 1 = view)."""
    root = tmp_path_factory.mktemp("local") / "ds"
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 1 << 18, (N, 2, GRID[0] * GRID[1]))
    tok[:, :, 0] = np.arange(N)[:, None]
    tok[:, :, 1] = np.arange(2)
    labels = np.arange(N) % CLASSES
    write_tokens(root, {"train": (tok, labels), "val": (tok[:8], labels[:8])}, grid=GRID, num_classes=CLASSES,
                 views=("center", "flip"), shard_bytes=1 << 11, images_per_chunk=20)
    return root


def _env(s3, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in (
        "S3_ENDPOINT_URL", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **s3.env(), **extra})
    return env


def _cli(s3, *args, env=None, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env or _env(s3), capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(p, pattern):
    import re

    err = p.stderr.strip()
    assert p.returncode == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, p.stderr[-3000:]
    assert re.search(pattern, err), err


def _all_objects(prefix_uri):
    return {k: object_store.get_bytes(object_store.join(prefix_uri, k)) for k, _ in object_store.list_objects(prefix_uri)}


def test_published_dataset_reads_back_exactly(aws, local, tmp_path):
    uri = f"s3://{BUCKET}/published"
    counts = publish.publish(local, uri, log=lambda *_: None)
    assert counts["uploaded"] > 10 and counts["skipped"] == 0
    objects = _all_objects(uri)
    assert objects["manifest.json"] == (local / "manifest.json").read_bytes()
    assert not {"state.json", ".lock", publish.MARKER} & set(objects)
    assert not any(aws.secret.encode() in data for data in objects.values())  # no secret in what was written

    a, b = TokenDataset(local), TokenDataset(uri)
    assert b.manifest == a.manifest and b.splits == ["train", "val"]
    for split, flt in (("train", None), ("train", "label = 3 AND view = 1"), ("val", None)):
        ra, rb = a.read_lance(split=split, filter=flt), b.read_lance(split=split, filter=flt)
        assert ra["id"] == rb["id"] and len(rb["id"]) > 0 and np.array_equal(ra["tokens"], rb["tokens"])
    ids = ["train-00000007-1", "val-00000002-0"]
    assert b.take(ids)["id"] == ids and np.array_equal(b.take(ids)["tokens"], a.take(ids)["tokens"])
    ma, mb = a.read_mds("train", tmp_path / "ca"), b.read_mds("train", tmp_path / "cb")
    assert ma["id"] == mb["id"] and np.array_equal(ma["tokens"], mb["tokens"]) and len(mb["id"]) == 2 * N
    assert b.bytes_per_token()["lance"]["bytes"] == a.bytes_per_token()["lance"]["bytes"]
    # Publishing the same dataset again: nothing to do.
    assert publish.publish(local, uri, log=lambda *_: None) == {"uploaded": 0, "skipped": counts["uploaded"],
                                                                "deleted": 0}


def test_inspect_and_verify_a_remote_dataset(aws, local):
    uri = f"s3://{BUCKET}/inspected"
    publish.publish(local, uri, log=lambda *_: None)
    p = _cli(aws, "-m", "dataprep.inspect_dataset", uri, "--json", "--rows", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout)
    assert info["lance_rows"] == 2 * (N + 8) and info["splits"]["train"]["encoded_images"] == N
    p = _cli(aws, "-m", "dataprep.inspect_dataset", uri, "--verify")
    assert p.returncode == 0 and f"verified {uri}: {2 * (N + 8) * 2} rows" in p.stdout, p.stdout + p.stderr[-3000:]
    # a shard damaged in the store is found
    key = next(k for k, _ in object_store.list_objects(uri) if k.startswith("mds/train/chunk-00001/shard."))
    data = bytearray(object_store.get_bytes(object_store.join(uri, key)))
    data[len(data) // 2] ^= 0xFF
    object_store.put_bytes(object_store.join(uri, key), bytes(data))
    p = _cli(aws, "-m", "dataprep.inspect_dataset", uri, "--verify")
    assert p.returncode == 1 and f"damaged: mds/train/{key[len('mds/train/'):]}: sha1 differs" in p.stdout, p.stdout


def test_killed_publish_shows_no_dataset_and_resumes(aws, local):
    uri = f"s3://{BUCKET}/killed"
    p = _cli(aws, "-m", "dataprep.publish", local, uri, "--_crash-after", "4")
    assert p.returncode == 17, p.stderr[-3000:]
    with pytest.raises(ManifestError, match="manifest.json is missing .*still being published"):
        TokenDataset(uri)
    p = _cli(aws, "-m", "dataprep.publish", local, uri)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ", 4 already there," in p.stdout, p.stdout
    assert TokenDataset(uri).manifest == TokenDataset(local).manifest
    assert publish.MARKER not in dict(object_store.list_objects(uri))


def test_publish_refuses_what_it_must_not_write(aws, local, tmp_path):
    # foreign objects under the prefix
    object_store.put_bytes(f"s3://{BUCKET}/foreign/notes.txt", b"mine")
    p = _cli(aws, "-m", "dataprep.publish", local, f"s3://{BUCKET}/foreign")
    _one_line_error(p, r"holds 1 objects that are not a dataset this tool published \(e.g. notes.txt\)")
    assert object_store.get_bytes(f"s3://{BUCKET}/foreign/notes.txt") == b"mine"
    # another dataset there
    other = tmp_path / "other"
    write_tokens(other, {"train": (np.zeros((4, 16), np.int64), [0, 1, 2, 3])}, grid=GRID, num_classes=CLASSES)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "2001-01-01T00:00:00+00:00"
    (other / "manifest.json").write_text(json.dumps(manifest))
    uri = f"s3://{BUCKET}/taken"
    publish.publish(local, uri, log=lambda *_: None)
    _one_line_error(_cli(aws, "-m", "dataprep.publish", other, uri), "holds another token dataset .*--overwrite")
    # missing bucket, wrong credentials, a local dataset that is not one, a target that is not s3
    _one_line_error(_cli(aws, "-m", "dataprep.publish", local, "s3://no-such-bucket/x"),
                    "bucket 'no-such-bucket' does not exist")
    _one_line_error(_cli(aws, "-m", "dataprep.publish", local, f"s3://{BUCKET}/y", env=_env(aws, **{
        "AWS_SECRET_ACCESS_KEY": "wrong"})), r"access denied \(SignatureDoesNotMatch\)")
    _one_line_error(_cli(aws, "-m", "dataprep.publish", tmp_path, f"s3://{BUCKET}/z"), "manifest.json is missing")
    assert _cli(aws, "-m", "dataprep.publish", local, tmp_path / "x").returncode == 2


def test_publish_refuses_an_unfinished_or_locked_dataset(aws, tmp_path):
    from dataprep import state

    root = tmp_path / "ds"
    write_tokens(root, {"train": (np.zeros((4, 16), np.int64), [0, 1, 2, 3]),
                        "val": (np.zeros((2, 16), np.int64), [0, 1])}, grid=GRID, num_classes=CLASSES)
    with state.Lock(root):  # a job writing it
        _one_line_error(_cli(aws, "-m", "dataprep.publish", root, f"s3://{BUCKET}/locked"),
                        r"is being written by another job \(pid \d+ on host")
    m = json.loads((root / "manifest.json").read_text())
    m["counts"]["val"]["complete"] = False
    m["commits"]["splits"]["val"]["mds_index_sha256"] = None
    (root / "manifest.json").write_text(json.dumps(m))
    _one_line_error(_cli(aws, "-m", "dataprep.publish", root, f"s3://{BUCKET}/unfinished"),
                    "split 'val' is not complete")
    assert not list(object_store.list_objects(f"s3://{BUCKET}/unfinished"))
    assert not list(object_store.list_objects(f"s3://{BUCKET}/locked"))


def test_readers_refuse_bad_targets_in_one_line(aws, local, monkeypatch):
    object_store.put_bytes(f"s3://{BUCKET}/nomanifest/mds/train/index.json", b"{}")
    cases = [(f"s3://{BUCKET}/nomanifest", "is not a token dataset: manifest.json is missing"),
             ("s3://no-such-bucket/ds", "bucket 'no-such-bucket' does not exist")]
    for uri, what in cases:
        with pytest.raises(ManifestError, match=what) as e:
            TokenDataset(uri)
        assert "\n" not in str(e.value)
        _one_line_error(_cli(aws, "-m", "dataprep.inspect_dataset", uri), what)
    uri = f"s3://{BUCKET}/creds"
    publish.publish(local, uri, log=lambda *_: None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ManifestError, match=r"access denied \(SignatureDoesNotMatch\)"):
        TokenDataset(uri)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ManifestError, match="no AWS credentials found"):
        TokenDataset(uri)


def test_a_profile_works_for_every_client(aws, local, tmp_path, monkeypatch):
    """AWS_PROFILE with a credentials file: boto3, Streaming and Lance all use it."""
    uri = f"s3://{BUCKET}/profile"
    publish.publish(local, uri, log=lambda *_: None)
    creds = tmp_path / "credentials"
    creds.write_text(f"[reader]\naws_access_key_id = {aws.key_id}\naws_secret_access_key = {aws.secret}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_PROFILE", "reader")
    ds = TokenDataset(uri)
    assert len(ds.read_lance(split="val")["id"]) == 16
    assert len(ds.read_mds("val", tmp_path / "cache")["id"]) == 16


# --- the Ray job ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_encode_job_writes_to_s3_and_resumes(aws, tmp_path):
    """encode.py --out s3://...: encoded into the staging directory, published at the end; a run killed
    mid-split publishes nothing, its rerun resumes and publishes; the next split updates the dataset."""
    from dataprep.sample_images import image_folder
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    data = tmp_path / "data"
    image_folder(data, classes=2, per_class=5)
    image_folder(data, classes=2, per_class=2, split="val")
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "ckpt")
    uri = f"s3://{BUCKET}/encoded"
    env = _env(aws, AWS_ENDPOINT_URL_S3="", RAY_USAGE_STATS_ENABLED="0")  # the endpoint given as an option

    def encode(split, *extra):
        return _cli(aws, "dataprep/encode.py", "--data", data, "--split", split, "--tokenizer", tmp_path / "ckpt",
                    "--out", uri, "--staging", tmp_path / "staging", "--s3-endpoint-url", aws.url,
                    "--resolution", 16, "--views", "center,flip", "--chunk-size", 4, "--batch-size", 4,
                    "--num-cpus", 2, *extra, env=env)

    p = encode("train", "--_crash-at", "2:state")
    assert p.returncode == 17, p.stderr[-3000:]
    assert "manifest.json" not in dict(object_store.list_objects(uri))  # nothing published yet
    p = encode("train")
    assert p.returncode == 0, p.stderr[-3000:]
    ds = TokenDataset(uri)
    assert ds.splits == ["train"] and ds.manifest.counts["train"].encoded_images == 10
    assert ds.manifest == TokenDataset(tmp_path / "staging").manifest
    # the next split killed before its end: the published dataset is untouched, and publishing the staging
    # directory by hand publishes only what its manifest committed (the same dataset: nothing to do)
    p = encode("val", "--_crash-at", "1:state")
    assert p.returncode == 17, p.stderr[-3000:]
    assert TokenDataset(uri).splits == ["train"]
    p = _cli(aws, "-m", "dataprep.publish", tmp_path / "staging", uri, "--s3-endpoint-url", aws.url, env=env)
    assert p.returncode == 0 and "already holds this dataset" in p.stdout, p.stdout + p.stderr[-3000:]
    assert TokenDataset(uri).splits == ["train"]
    p = encode("val")
    assert p.returncode == 0, p.stderr[-3000:]
    ds = TokenDataset(uri)
    assert ds.splits == ["train", "val"] and len(ds.read_lance(split="val")["id"]) == 2 * 4
    local = TokenDataset(tmp_path / "staging")
    assert np.array_equal(ds.read_lance()["tokens"], local.read_lance()["tokens"])
    remote_lance = {k for k, _ in object_store.list_objects(uri) if k.startswith("tokens.lance/")}
    assert remote_lance == {str(p.relative_to(tmp_path / "staging")) for p in
                            (tmp_path / "staging" / "tokens.lance").rglob("*") if p.is_file()}  # stale ones removed
    assert aws.secret not in (tmp_path / "staging" / "manifest.json").read_text()
    _one_line_error(encode("train", "--s3-endpoint-url", "ftp://x"), "must start with http")


# --- Stage-2 training -------------------------------------------------------------------------------------

def _train_args(data, out):
    return ["-m", "stage2_ar.train", "--config", "ar-tiny", f"data.path={data}", f"out_dir={out}",
            "data.clean_stale_shm=false", "data.num_workers=2", "schedule.max_steps=30", "schedule.warmup_steps=3",
            "ckpt_every=3", "keep_last=2", "log_every=1"]


@pytest.mark.slow
def test_stage2_streams_from_s3_and_resumes_exactly_after_a_kill(aws, local, tmp_path):
    uri = f"s3://{BUCKET}/train"
    publish.publish(local, uri, log=lambda *_: None)
    env = _env(aws, AWS_ENDPOINT_URL_S3="")  # the endpoint given as data.s3_endpoint_url
    # the default start-up clean-up on: it frees what the killed run left registered for this cache
    remote = _train_args(uri, tmp_path / "remote") + [f"data.s3_endpoint_url={aws.url}", "data.clean_stale_shm=true"]
    # the uninterrupted reference first: two Streaming readers started at the same instant can race for one
    # shared-memory prefix
    full = subprocess.run([sys.executable, *_train_args(local, tmp_path / "full")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    killed = subprocess.Popen([sys.executable, *remote], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not (tmp_path / "remote" / "step-00000006").is_dir():
        assert killed.poll() is None and time.time() - t0 < 300, "the S3 run ended before it was killed"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # the trainer and its loader workers, mid-epoch
    killed.wait()
    assert not (tmp_path / "remote" / "step-00000030").exists()
    p = subprocess.run([sys.executable, *remote], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    a = load_file(str(tmp_path / "full" / "step-00000030" / "model.safetensors"))
    b = load_file(str(tmp_path / "remote" / "step-00000030" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in (tmp_path / "remote").rglob("*"):  # config, logs, metrics, checkpoints: no secret anywhere
        if f.is_file() and "mds-cache" not in f.parts:
            assert aws.secret.encode() not in f.read_bytes(), f


def test_stage2_refuses_bad_s3_datasets_in_one_line(aws, local, tmp_path):
    env = _env(aws)
    cases = [(f"s3://{BUCKET}/absent", "manifest.json is missing"),
             ("s3://no-such-bucket/ds", "bucket 'no-such-bucket' does not exist")]
    for uri, what in cases:
        _one_line_error(_cli(aws, *_train_args(uri, tmp_path / "run"), env=env), what)
    uri = f"s3://{BUCKET}/stage2-creds"
    publish.publish(local, uri, log=lambda *_: None)
    _one_line_error(_cli(aws, *_train_args(uri, tmp_path / "run"), env=_env(aws, AWS_SECRET_ACCESS_KEY="bad")),
                    r"access denied \(SignatureDoesNotMatch\)")
    assert not Path(tmp_path / "run").exists()
