"""Stage-2 data: contract-format MDS shards -> (sub-tokens, label), multi-rank coverage and exact resume.

Every sample's first token stores its own row number, so a batch tells exactly which rows it holds and
the decode (unpack + sub-token split) is checked against the array the shards were written from.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared.tokens import join_index
from stage2_ar.data import ManifestError, TokenLayout, build_loader, check_manifest, read_manifest
from stage2_ar.shard_writer import write_manifest, write_split
from free_port import free_port

REPO = Path(__file__).resolve().parents[1]
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
    write_split(out, "train", tok, labels, size_limit=1 << 11)  # several shards
    write_manifest(out, grid=GRID, classes=[f"c{i}" for i in range(CLASSES)], counts={"train": N}, resolution=8)
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
    with pytest.raises(ManifestError, match="tokens per image"):
        check_manifest({**m, "tokens_per_image": 15}, ok)


def test_missing_or_foreign_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ManifestError, match="expected format"):
        read_manifest(str(tmp_path))


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from shared.tokens import join_index
    from stage2_ar.data import TokenLayout, build_loader, read_manifest
    ds, cache, out, mode, stop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    lay = TokenLayout.from_manifest(read_manifest(ds))
    dl = build_loader(ds, split="train", batch_size=4, layout=lay, num_workers=2, cache_dir=cache,
                      shuffle=True, shuffle_seed=11, num_canonical_nodes=2)
    if mode == "resume":
        dl.load_state_dict(json.load(open(out + ".state")))
    rows = []
    for i, (subs, labels) in enumerate(dl):
        rows += join_index(subs, (6, 12))[:, 0].tolist()
        if mode == "first" and i + 1 == stop:
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
        procs.append(_run(script, [dataset.path, tmp_path / "cache", tmp_path / f"rank{rank}.json", "full", 0], env))
    _wait(procs)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == N // 2  # same number of steps on both ranks
    assert sorted(seen[0] + seen[1]) == list(range(N))  # every sample exactly once


@pytest.mark.slow
def test_mid_epoch_state_resumes_exactly_in_new_process(dataset, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    full = _run(script, [dataset.path, tmp_path / "c_full", tmp_path / "full.json", "full", 0])
    first = _run(script, [dataset.path, tmp_path / "c_first", tmp_path / "part.json", "first", 5])
    _wait([full, first])
    state = json.loads((tmp_path / "part.json.state").read_text())
    assert state["sample_in_epoch"] == 5 * 4
    part = json.loads((tmp_path / "part.json").read_text())
    rest = _run(script, [dataset.path, tmp_path / "c_rest", tmp_path / "part.json", "resume", 0])
    _wait([rest])
    rest_rows = json.loads((tmp_path / "part.json").read_text())
    expected = json.loads((tmp_path / "full.json").read_text())
    assert sorted(expected) == list(range(N))
    assert part + rest_rows == expected


def test_reads_dataprep_chunked_layout(tmp_path):
    """dataprep commits mds/<split>/chunk-NNNNN/ directories joined by a merged index.json."""
    writers = pytest.importorskip("dataprep.writers")
    from shared.tokens import pack_tokens

    tok = make_tokens(40, seed=1)
    rows = [{"id": f"train-{i:08d}-0", "label": i % CLASSES, "view": 0, "tokens": pack_tokens(tok[i]).tobytes()}
            for i in range(40)]
    writers.write_mds_chunk(tmp_path, "train", 0, rows[:24])
    writers.write_mds_chunk(tmp_path, "train", 1, rows[24:])
    writers.merge_mds(tmp_path, "train", [0, 1])
    write_manifest(tmp_path, grid=GRID, classes=[f"c{i}" for i in range(CLASSES)], counts={"train": 40}, resolution=8)
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
