"""Stage-2 training from object storage through an outage: the suite's S3 server behind a TCP proxy that the
test cuts when the shards start being read. Within ``data.retry_seconds`` the run waits and goes on to the
same weights as a run that never saw an outage; past it, the run stops in one line naming the endpoint, and
run again once the store is back it ends with those same weights. No sample is skipped."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from support.bounded_run import finish
from support.s3_server import BUCKET, moto_server
from support.synthetic_tokens import write_tokens
from support.tcp_proxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
STEPS = 12


@pytest.fixture(scope="module")
def s3():
    with moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A local dataset of 96 images in many small shards."""
    root = tmp_path_factory.mktemp("outage")
    rng = np.random.default_rng(0)
    labels = np.arange(96) % 10
    write_tokens(root / "ds", {"train": (rng.integers(0, 1 << 18, (96, 16)), labels)}, grid=(4, 4),
                 num_classes=10, shard_bytes=1 << 11)
    return root


@pytest.fixture(scope="module")
def published(s3, dataset):
    from dataprep import publish
    from shared import object_store

    saved = {k: os.environ.get(k) for k in (*s3.env(), "S3_ENDPOINT_URL")}
    os.environ.update(s3.env())
    object_store.configure()
    try:
        uri = f"s3://{BUCKET}/outage"
        publish.publish(dataset / "ds", uri, log=lambda *_: None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return uri


@pytest.fixture(scope="module")
def reference(s3, dataset):
    """The weights of a run on the local copy that never saw an outage."""
    p = _train(s3, dataset / "ds", dataset / "reference")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return load_file(str(dataset / "reference" / f"step-{STEPS:08d}" / "model.safetensors"))


def _train(s3, data, out, *extra, endpoint=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in (
        "S3_ENDPOINT_URL", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **s3.env()})
    env.pop("AWS_ENDPOINT_URL_S3")  # the endpoint (the proxy) is the run's option
    args = [f"data.path={data}", f"out_dir={out}", "data.clean_stale_shm=false", "data.num_workers=2",
            f"schedule.max_steps={STEPS}", "schedule.warmup_steps=3", "ckpt_every=3", "log_every=1",
            "sample_every=0", *([f"data.s3_endpoint_url={endpoint}"] if endpoint else []), *extra]
    return subprocess.Popen([sys.executable, "-m", "stage2_ar.train", "--config", "ar-tiny", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _same_weights(a, path):
    b = load_file(str(path / f"step-{STEPS:08d}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _proxy(s3):
    host, port = s3.url.rsplit("/", 1)[1].split(":")
    return TcpProxy(host, int(port))


@pytest.mark.slow
def test_an_outage_within_the_retry_window_is_waited_out(s3, published, reference, tmp_path):
    with _proxy(s3) as proxy:
        proxy.cut_on(b"/mds/train/chunk-", seconds=6)
        code, out = finish(_train(s3, published, tmp_path / "run", "data.retry_seconds=60",
                                   endpoint=f"http://127.0.0.1:{proxy.port}"), 400)
        assert proxy.outages == 1
    assert code == 0, out[-3000:]
    assert "retrying for up to 60 s" in out, out[-3000:]
    _same_weights(reference, tmp_path / "run")


@pytest.mark.slow
def test_an_outage_past_the_retry_window_stops_in_one_line_and_resumes(s3, published, reference, tmp_path):
    with _proxy(s3) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        proxy.cut_on(b"/mds/train/chunk-")  # and it stays cut
        t0 = time.monotonic()
        code, out = finish(_train(s3, published, tmp_path / "run", "data.retry_seconds=3", endpoint=url), 120)
        assert proxy.outages == 1
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert errors[0].startswith(f"error: {url} unreachable for 3 s (data.retry_seconds) reading "
                                    f"{published}/mds/train/chunk-"), errors[0]
        assert time.monotonic() - t0 < 90
        assert not (tmp_path / "run" / f"step-{STEPS:08d}").exists()
        proxy.restore()
        code, out = finish(_train(s3, published, tmp_path / "run", "data.retry_seconds=3", endpoint=url), 400)
    assert code == 0, out[-3000:]
    _same_weights(reference, tmp_path / "run")
