"""``ray start --head`` + the README's ``ray job submit --working-dir . -- "$PWD/.venv/bin/python"
dataprep/encode.py --code-version "$(git describe ...)" ...``, run as written by a shell: the job runs on a
separately started cluster whose PATH does not lead to the project's environment (it connects through
RAY_ADDRESS, set by the job server), writes the same dataset as an in-process run would, and records the
submitted commit although the upload leaves .git out."""
import json
import os
import shlex
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

import ray  # noqa: F401  (a pinned dependency: if it is missing the tests fail, they do not skip)

from dataprep import images, listing  # noqa: E402
from dataprep.sample_images import image_folder  # noqa: E402
from shared.token_dataset import TokenDataset, row_id  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
# The documented form, word for word (README "Encoding ImageNet with Ray"); the test appends its own inputs.
README_FORM = ('ray job submit --address http://HEAD:8265 --working-dir . -- \\\n'
               '    "$PWD/.venv/bin/python" dataprep/encode.py --code-version "$(git describe --always --dirty)"')


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
    assert RAY.is_file(), f"the ray CLI is not installed beside this Python ({RAY})"
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    data = tmp_path / "data"
    image_folder(data, classes=2, per_class=3)
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "ckpt")
    out = tmp_path / "job-out"
    # File-list input (paths relative to the list's folder), labels reversed against the folder order.
    lst = listing.scan_folder(data, "train")
    file_list = data / "list.tsv"
    file_list.write_text("".join(f"{it.path}\t{1 - it.label}\n" for it in lst.items))

    # Local test cluster: token auth off on both sides (Ray 2.60 turns it on by default; CLI clients
    # would otherwise fail with "Missing authentication token"). Every port is chosen free so the test
    # cannot collide with another Ray instance on the machine.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # A head started from the project's environment without activating it: its PATH (which the job's
    # command runs with) leads to another `python`, if any.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d and d != venv_bin)
    env.pop("VIRTUAL_ENV", None)
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
        readme = (REPO / "README.md").read_text()
        assert README_FORM in readme, "the README's ray job submit command changed: update README_FORM"
        inputs = ["--file-list", str(file_list), "--split", "train", "--tokenizer", str(tmp_path / "ckpt"),
                  "--out", str(out), "--resolution", "32", "--batch-size", "2", "--chunk-size", "4", "--actors", "1"]
        line = README_FORM.replace("http://HEAD:8265", address) + " " + " ".join(map(shlex.quote, inputs))
        # The submitting shell: `ray` on its PATH (an activated environment), in the repository root.
        client = {**env, "PATH": venv_bin + os.pathsep + env["PATH"]}
        job = subprocess.run(["bash", "-c", line], env=client, cwd=REPO, capture_output=True, text=True, timeout=400)
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
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    assert ds.manifest.code_version.endswith("+" + described), ds.manifest.code_version
    assert json.loads((out / "manifest.json").read_text())["code_version"] == ds.manifest.code_version
    c = ds.manifest.counts["train"]
    assert c.encoded_images == 6 and c.rows == 12 and c.complete
    rows = ds.read_lance()
    assert ds.manifest.classes == ("0", "1")
    assert [1 - int(p.split("/")[1][-1]) for p in rows["path"]] == rows["label"]
    # The job's tokens equal an in-process encoding (one batch of 2 images x 2 views per forward).
    tok = Tokenizer.from_checkpoint(tmp_path / "ckpt")
    for lo, hi in listing.chunk_ranges(6, 4):
        for g in listing.groups(lst.items[lo:hi], 2):
            crops = np.concatenate([images.load_views(data / it.path, 32, ["center", "flip"]) for it in g])
            ref = tok.encode(images.to_model_input(crops)).numpy()
            for i, it in enumerate(g):
                for v in range(2):
                    k = rows["id"].index(row_id("train", it.index, v))
                    np.testing.assert_array_equal(rows["tokens"][k], ref[2 * i + v])
