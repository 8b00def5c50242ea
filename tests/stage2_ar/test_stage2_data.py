"""Stage-2 data: contract-format MDS shards -> (sub-tokens, label), multi-rank coverage and exact resume.

Every sample's first token stores its own row number, so a batch tells exactly which rows it holds and
the decode (unpack + sub-token split) is checked against the array the shards were written from.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared.tokens import join_index
from shared.token_dataset import read_manifest
from stage2_ar.data import ManifestError, TokenLayout, build_loader, check_manifest
from support.free_port import free_port
from support.synthetic_tokens import write_tokens

REPO = Path(__file__).resolve().parents[2]
N, GRID, CLASSES = 96, (4, 4), 10


def make_tokens(n=N, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 1 << 18, size=(n, GRID[0] * GRID[1]))
    tok[:, 0] = np.arange(n)  # row number, recoverable from any batch
    return tok


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    tok = make_tokens()
    labels = (np.arange(N) * 7) % CLASSES
    write_tokens(out, {"train": (tok, labels)}, grid=GRID, num_classes=CLASSES, shard_bytes=1 << 11)  # several shards
    return SimpleNamespace(path=out, tokens=tok, labels=labels)


def test_decode_matches_written_tokens(dataset, tmp_path):
    lay = TokenLayout.from_manifest(read_manifest(str(dataset.path)))
    dl = build_loader(str(dataset.path), split="train", batch_size=8, layout=lay, cache_dir=str(tmp_path / "c"),
                      shuffle=True, shuffle_seed=3)
    rows = []
    for subs, labels in dl:
        assert len(subs) == 2 and subs[0].shape == (8, 16) and subs[0].dtype == torch.int64
        assert int(subs[0].max()) < 64 and int(subs[1].max()) < 4096
        idx = join_index(subs, (6, 12))
        r = idx[:, 0].numpy()
        np.testing.assert_array_equal(idx.numpy(), dataset.tokens[r])
        np.testing.assert_array_equal(labels.numpy(), dataset.labels[r])
        rows += r.tolist()
    assert sorted(rows) == list(range(N))
    assert rows != list(range(N))  # shuffled
    assert dl.state_dict()["sample_in_epoch"] == N  # counts samples, not sub-tokens


def test_manifest_mismatch_is_refused_in_one_line(dataset):
    m = read_manifest(str(dataset.path))
    ok = SimpleNamespace(bits=(6, 12), grid=GRID, num_classes=CLASSES)
    check_manifest(m, ok)
    bad = [
        (SimpleNamespace(bits=(8, 12), grid=GRID, num_classes=CLASSES), "bits per token"),
        (SimpleNamespace(bits=(9, 9), grid=GRID, num_classes=CLASSES), "sub-token split"),
        (SimpleNamespace(bits=(6, 12), grid=(16, 16), num_classes=CLASSES), "token grid"),
        (SimpleNamespace(bits=(6, 12), grid=GRID, num_classes=1000), "number of classes"),
    ]
    for cfg, what in bad:
        with pytest.raises(ManifestError, match=what) as e:
            check_manifest(m, cfg)
        assert "\n" not in str(e.value)


def test_missing_foreign_old_or_inconsistent_manifest(dataset, tmp_path):
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ManifestError, match="expected format"):
        read_manifest(str(tmp_path))
    # An older version, a tokens-per-image count that disagrees with the grid, v1 test datasets' int counts.
    good = json.loads((dataset.path / "manifest.json").read_text())
    for bad, what in (({"version": 1}, "version 1 .*older dataset"), ({"tokens_per_image": 15}, "tokens_per_image"),
                      ({"counts": {"train": N}}, "counts.train must be a JSON object")):
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(ManifestError, match=what) as e:
            read_manifest(str(tmp_path))
        assert "\n" not in str(e.value)


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from shared.tokens import join_index
    from shared.token_dataset import read_manifest
    from stage2_ar.data import TokenLayout, build_loader
    ds, cache, out, mode, stop, epochs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], *map(int, sys.argv[5:7])
    lay = TokenLayout.from_manifest(read_manifest(ds))
    dl = build_loader(ds, split="train", batch_size=4, layout=lay, num_workers=2, cache_dir=cache,
                      shuffle=True, shuffle_seed=11, num_canonical_nodes=2, view_seed=11)
    if mode == "resume":
        dl.load_state_dict(json.load(open(out + ".state")))
    rows = []
    for epoch in range(epochs):
        for i, (subs, labels) in enumerate(dl):
            rows += join_index(subs, (6, 12))[:, :2].tolist()  # (row number, view) of each sample
            if mode == "first" and epoch == epochs - 1 and i + 1 == stop:
                json.dump(dl.state_dict(), open(out + ".state", "w"))
                break
    json.dump(rows, open(out, "w"))
""")


def _run(script, args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=120):
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_ranks_two_workers_cover_epoch_exactly_once(dataset, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(_run(script, [dataset.path, tmp_path / "cache", tmp_path / f"rank{rank}.json", "full", 0, 1], env))
    _wait(procs)
    seen = [[r for r, _ in json.loads((tmp_path / f"rank{r}.json").read_text())] for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == N // 2  # same number of steps on both ranks
    assert sorted(seen[0] + seen[1]) == list(range(N))  # every sample exactly once


@pytest.fixture(scope="module")
def three_views(tmp_path_factory):
    """Three stored views per image; token 0 holds the row number, token 1 the view."""
    out = tmp_path_factory.mktemp("views")
    tok = np.repeat(make_tokens()[:, None], 3, 1)
    tok[:, :, 1] = np.arange(3)
    write_tokens(out, {"train": (tok, (np.arange(N) * 7) % CLASSES)}, grid=GRID, num_classes=CLASSES,
                 views=("center", "flip", "crop2"), shard_bytes=1 << 11)
    return out


@pytest.mark.slow
def test_mid_epoch_state_resumes_exactly_in_new_process(three_views, tmp_path):
    """Two epochs of a three-view dataset: one sample per image per epoch, a different view of every
    image in each epoch, and a run stopped in the second epoch resumes with the same samples and views."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # one after the other: two Streaming readers created at the same instant can race for the same
    # shared-memory prefix (FileExistsError in Streaming's get_shm_prefix)
    _wait([_run(script, [three_views, tmp_path / "c_full", tmp_path / "full.json", "full", 0, 2])])
    _wait([_run(script, [three_views, tmp_path / "c_first", tmp_path / "part.json", "first", 5, 2])])
    state = json.loads((tmp_path / "part.json.state").read_text())
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 5 * 4)
    part = json.loads((tmp_path / "part.json").read_text())
    rest = _run(script, [three_views, tmp_path / "c_rest", tmp_path / "part.json", "resume", 0, 1])
    _wait([rest])
    rest_rows = json.loads((tmp_path / "part.json").read_text())
    expected = json.loads((tmp_path / "full.json").read_text())
    epochs = expected[:N], expected[N:]
    assert len(expected) == 2 * N and all(sorted(r for r, _ in e) == list(range(N)) for e in epochs)
    views = [dict(map(tuple, e)) for e in epochs]
    assert all(views[0][i] != views[1][i] for i in range(N))  # a cycle of 3 epochs takes each view once
    assert all(set(v.values()) == {0, 1, 2} for v in views)
    assert part + rest_rows == expected


def test_epoch_view_cycles_through_every_view():
    from stage2_ar.data import epoch_view

    for views in (1, 2, 10):
        for image in range(50):
            for cycle in range(3):
                got = [epoch_view(7, cycle * views + e, image, views) for e in range(views)]
                assert sorted(got) == list(range(views))
    orders = {tuple(epoch_view(7, e, image, 10) for e in range(10)) for image in range(200)}
    assert len(orders) > 190  # orders differ between images...
    assert [epoch_view(8, e, 3, 10) for e in range(10)] != [epoch_view(7, e, 3, 10) for e in range(10)]  # ...seeds
    assert [epoch_view(7, e, 3, 10) for e in range(10)] != [epoch_view(7, e, 3, 10) for e in range(10, 20)]


def test_reads_dataprep_chunked_layout(tmp_path):
    """dataprep commits mds/<split>/chunk-NNNNN/ directories joined by a merged index.json."""
    tok = make_tokens(40, seed=1)
    write_tokens(tmp_path, {"train": (tok, np.arange(40) % CLASSES)}, grid=GRID, num_classes=CLASSES,
                 images_per_chunk=24)
    assert sorted(p.name for p in (tmp_path / "mds" / "train").iterdir()) == ["chunk-00000", "chunk-00001",
                                                                              "index.json"]
    lay = TokenLayout.from_manifest(read_manifest(str(tmp_path)))
    dl = build_loader(str(tmp_path), split="train", batch_size=8, layout=lay, cache_dir=str(tmp_path / "cache"))
    got = {}
    for subs, labels in dl:
        idx = join_index(subs, (6, 12))
        for row, lab in zip(idx.numpy(), labels.tolist()):
            got[int(row[0])] = (row, lab)
    assert sorted(got) == list(range(40))
    for i, (row, lab) in got.items():
        np.testing.assert_array_equal(row, tok[i])
        assert lab == i % CLASSES


SHM_READER = textwrap.dedent("""
    import os, sys
    from shared.token_dataset import read_manifest
    from stage2_ar.data import TokenLayout, make_dataset
    ds_path, cache = sys.argv[1:3]
    ds = make_dataset(ds_path, split="train", batch_size=4, layout=TokenLayout.from_manifest(read_manifest(ds_path)),
                      cache_dir=cache, shuffle=False)
    print(ds._shm_prefix_int, flush=True)
    sys.stdin.readline()  # stays alive (another job on the node) until told, then reads a sample
    print(int(ds[3][1]), flush=True)
""")


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="Streaming's shared memory lives in /dev/shm on Linux")
def test_stale_shm_cleanup_spares_live_jobs(dataset, tmp_path):
    """The start-up clean-up (``data.clean_stale_shm``) removes what killed readers left and never the
    segments of a job still reading on the node (Streaming's own clean-up removes those too)."""
    from stage2_ar.data import clean_stale_shared_memory

    script = tmp_path / "reader.py"
    script.write_text(SHM_READER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def reader(cache):
        p = subprocess.Popen([sys.executable, str(script), dataset.path, tmp_path / cache], env=env,
                             start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        return p, int(p.stdout.readline())

    def kill(p):  # with its whole process group (its resource tracker too), as a scheduler or OOM kill does
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)

    def names(prefix):
        return {p.name for p in Path("/dev/shm").glob(f"{prefix:06d}_*")}

    live = []
    try:
        live.append(reader("live-1"))
        killed, dead = reader("dead-1")
        kill(killed)
        left, first = names(dead), names(live[0][1])
        assert f"{dead:06d}_locals" in left and f"{live[0][1]:06d}_locals" in first
        removed = set(clean_stale_shared_memory())
        assert left <= removed and not names(dead) and names(live[0][1]) == first and not first & removed
        # A reader started after a kill keeps the dead prefix mapped (Streaming's prefix search): only
        # the killed run's own cache directory tells that prefix is stale.
        killed, dead = reader("dead-2")
        kill(killed)
        left = names(dead)
        live.append(reader("live-2"))
        assert not left & set(clean_stale_shared_memory()) and names(dead) == left
        removed = set(clean_stale_shared_memory([str(tmp_path / "dead-2")]))
        assert left <= removed and not names(dead)
        for p, prefix in live:
            assert names(prefix) and not names(prefix) & removed
        for p, _ in live:  # the live readers still work
            out, err = p.communicate("\n", timeout=120)
            assert p.returncode == 0, err[-2000:]
            assert int(out) == dataset.labels[3]
    finally:
        for p, _ in live:
            if p.poll() is None:
                p.kill()
