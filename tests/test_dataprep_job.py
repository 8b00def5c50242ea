"""``ray start --head`` + ``ray job submit --working-dir . -- python dataprep/encode.py ...``: the job runs
on a separately started cluster (it connects through RAY_ADDRESS, set by the job server) and writes the
same dataset as an in-process run would."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray")

from dataprep import images, manifest, samples  # noqa: E402
from dataprep.reader import TokenDataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url, timeout, proc):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout}s")


@pytest.mark.slow
def test_ray_job_submit(tmp_path):
    if not RAY.is_file():
        pytest.skip("the ray CLI is not installed beside this Python")
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    data = tmp_path / "data"
    samples.image_folder(data, classes=2, per_class=3)
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "ckpt")
    out = tmp_path / "job-out"
    # File-list input (paths relative to the list's folder), labels reversed against the folder order.
    listing = manifest.scan_folder(data, "train")
    file_list = data / "list.tsv"
    file_list.write_text("".join(f"{it.path}\t{1 - it.label}\n" for it in listing.items))

    # Local test cluster: token auth off on both sides (Ray 2.60 turns it on by default; CLI clients
    # would otherwise fail with "Missing authentication token"). Every port is chosen free so the test
    # cannot collide with another Ray instance on the machine.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, rt_agent, metrics, om, nm = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayjob")  # short: Ray's unix socket paths must stay < 108 chars
    head_log = open(tmp_path / "ray-head.log", "wb")  # a file, not a pipe nobody drains
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         f"--object-store-memory={100 << 20}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
         f"--object-manager-port={om}", f"--node-manager-port={nm}", f"--temp-dir={temp_dir}"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_http(f"{address}/api/version", 120, head)
        cmd = [str(RAY), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
               sys.executable, "dataprep/encode.py", "--file-list", str(file_list), "--split", "train",
               "--tokenizer", str(tmp_path / "ckpt"), "--out", str(out), "--resolution", "32",
               "--batch-size", "2", "--chunk-size", "4", "--actors", "1"]
        job = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert "connected to Ray cluster" in log and "succeeded" in log
    finally:
        # Stop only the cluster this test started: SIGTERM drains and stops the head, then whatever is
        # left in its process session (started with start_new_session) is killed.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        head_log.close()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)

    ds = TokenDataset(out)
    c = ds.manifest["counts"]["train"]
    assert c["encoded_images"] == 6 and c["rows"] == 12 and c["complete"]
    rows = ds.read_lance()
    assert ds.manifest["classes"] == ["0", "1"]
    assert [1 - int(p.split("/")[1][-1]) for p in rows["path"]] == rows["label"]
    # The job's tokens equal an in-process encoding (one batch of 2 images x 2 views per forward).
    tok = Tokenizer.from_checkpoint(tmp_path / "ckpt")
    for lo, hi in manifest.chunk_ranges(6, 4):
        for g in manifest.groups(listing.items[lo:hi], 2):
            crops = np.concatenate([images.load_views(data / it.path, 32, ["center", "flip"]) for it in g])
            ref = tok.encode(images.to_model_input(crops)).numpy()
            for i, it in enumerate(g):
                for v in range(2):
                    k = rows["id"].index(manifest.row_id("train", it.index, v))
                    np.testing.assert_array_equal(rows["tokens"][k], ref[2 * i + v])
