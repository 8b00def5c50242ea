"""Stage-2 training on damaged, missing and unreadable shards: the run never consumes a sample whose bytes
differ from index.json, and every data error ends it within seconds, in one line, with a non-zero status
(the loader workers shut down instead of keeping the process alive)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from support.bounded_run import finish
from support.synthetic_tokens import write_tokens

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 60  # a failed run must be over within this (it used to never end)


def _dataset(root: Path) -> Path:
    """128 images of a 4x4 grid in several small zstd shards (a few KB each)."""
    rng = np.random.default_rng(0)
    labels = np.arange(128) % 10
    write_tokens(root, {"train": (rng.integers(0, 1 << 18, (128, 16)), labels)}, grid=(4, 4), num_classes=10,
                 shard_bytes=1 << 12)
    return root


def _shards(root: Path):
    index = json.loads((root / "mds" / "train" / "index.json").read_text())
    return [root / "mds" / "train" / s["zip_data"]["basename"] for s in index["shards"]]


def _flip_a_token(shard: Path) -> None:
    """Change one token byte of the shard's last sample and re-compress it: a valid shard whose content no
    longer matches index.json (what a bit flip on disk does, minus a decompression error)."""
    raw = bytearray(zstandard.ZstdDecompressor().decompress(shard.read_bytes()))
    raw[-1] ^= 0x5A
    shard.write_bytes(zstandard.ZstdCompressor().compress(bytes(raw)))


def _run(data: Path, out: Path, *extra: str, env=None) -> subprocess.Popen:
    ranks = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in ranks}, **(env or {})}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    args = [f"data.path={data}", f"out_dir={out}", "data.clean_stale_shm=false", "data.num_workers=2",
            "schedule.max_steps=16", "schedule.warmup_steps=1", "ckpt_every=100", "log_every=1", "sample_every=0",
            *extra]
    return subprocess.Popen([sys.executable, "-m", "stage2_ar.train", "--config", "ar-tiny", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(p: subprocess.Popen, bound: float = BOUND_S):
    """(status, output, seconds); a run still alive after ``bound`` fails the test (and is killed)."""
    t0 = time.monotonic()
    code, out = finish(p, bound)
    seconds = time.monotonic() - t0
    # nothing of the run (a loader worker) outlives it for long (multiprocessing's resource tracker ends
    # once its pipe closes)
    deadline = time.monotonic() + 10
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = subprocess.run(["ps", "-o", "pid,args", "-g", str(p.pid)], capture_output=True, text=True).stdout
    assert not _group_alive(p.pid), f"processes of the run outlived it:\n{left}"
    return code, out, seconds


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _one_error_line(out: str) -> str:
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_shard_that_differs_from_its_checksum_stops_the_run(tmp_path):
    data = _dataset(tmp_path / "ds")
    shards = _shards(data)
    assert len(shards) >= 3
    _flip_a_token(shards[1])
    code, out, _ = _finish(_run(data, tmp_path / "run"))
    line = _one_error_line(out)
    assert code == 1
    assert line == f"error: shard {shards[1]}: sha1 differs from index.json (damaged)", line
    assert not list((tmp_path / "run").glob("step-*"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated", "unreadable"])
def test_a_missing_or_unreadable_shard_ends_the_run_promptly(tmp_path, damage):
    data = _dataset(tmp_path / "ds")
    shard = _shards(data)[2]
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        shard.chmod(0)
    code, out, seconds = _finish(_run(data, tmp_path / "run"))
    line = _one_error_line(out)
    assert code == 1 and seconds < BOUND_S
    want = "sha1 differs from index.json (damaged)" if damage == "truncated" else "cannot read shard"
    assert str(shard) in line and want in line, line


def test_a_damaged_cached_copy_is_fetched_again(tmp_path):
    """A shard copy already in the cache is checked when the stream opens: a damaged one is fetched again
    (and checked) from the source instead of being read."""
    from shared.token_dataset import read_manifest
    from stage2_ar.data import TokenLayout, make_dataset

    data = _dataset(tmp_path / "ds")
    layout = TokenLayout.from_manifest(read_manifest(str(data)))
    cache = tmp_path / "cache"

    def labels_and_tokens():
        ds = make_dataset(str(data), split="train", batch_size=4, layout=layout, cache_dir=str(cache), shuffle=False)
        return [(int(ds[i][1]), [s.tolist() for s in ds[i][0]]) for i in range(ds.num_samples)]

    want = labels_and_tokens()
    cached = sorted((cache / "train").rglob("*.mds"))
    assert cached
    raw = bytearray(cached[0].read_bytes())
    raw[-1] ^= 0x5A
    cached[0].write_bytes(bytes(raw))
    assert labels_and_tokens() == want


def test_the_loader_raises_one_line_naming_the_shard(tmp_path):
    """No workers: the error is raised by the loader itself, as a ``ShardError`` of one line."""
    from shared.token_dataset import read_manifest
    from stage2_ar.data import ShardError, TokenLayout, build_loader

    data = _dataset(tmp_path / "ds")
    shard = _shards(data)[1]
    _flip_a_token(shard)
    loader = build_loader(str(data), split="train", batch_size=4, shuffle=False, cache_dir=str(tmp_path / "cache"),
                          layout=TokenLayout.from_manifest(read_manifest(str(data))))
    with pytest.raises(ShardError) as e:
        for _ in loader:
            pass
    assert str(e.value) == f"shard {shard}: sha1 differs from index.json (damaged)"


def test_a_negative_retry_window_is_refused(tmp_path):
    from stage2_ar.train import main

    data = _dataset(tmp_path / "ds")
    with pytest.raises(SystemExit) as e:
        main(["--config", "ar-tiny", f"data.path={data}", f"out_dir={tmp_path / 'run'}", "data.retry_seconds=-1"])
    assert str(e.value) == "error: data.retry_seconds must be >= 0, got -1.0"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_damaged_shard_ends_every_rank(tmp_path):
    """2 DDP ranks (gloo): every rank stops within the bound, in one line, with status 1."""
    from support.free_port import free_port

    data = _dataset(tmp_path / "ds")
    _flip_a_token(_shards(data)[-1])
    port = str(free_port())
    procs = [_run(data, tmp_path / "run", env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                "MASTER_PORT": port}) for r in range(2)]
    results = [_finish(p) for p in procs]
    for code, out, _ in results:
        assert code == 1 and "sha1 differs from index.json (damaged)" in _one_error_line(out), out[-2000:]
