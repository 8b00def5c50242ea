"""dataprep.publish uploads only a verified dataset, and only its committed Lance versions: a missing shard
or a changed byte is refused in one line before anything is written remotely (against the suite's S3 server)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support.s3_server import BUCKET
from shared import object_store
from shared.token_dataset import TokenDataset
from support.synthetic_tokens import write_tokens

REPO = Path(__file__).resolve().parents[2]
GRID, N, CLASSES = (4, 4), 12, 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "ds"
    tok = np.random.default_rng(0).integers(0, 1 << 18, (N, 2, GRID[0] * GRID[1]))
    write_tokens(root, {"train": (tok, np.arange(N) % CLASSES)}, grid=GRID, num_classes=CLASSES,
                 views=("center", "flip"), images_per_chunk=5)
    return root


def _publish_cli(s3, root, uri):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"PYTHONPATH": str(REPO), **s3.env()})
    return subprocess.run([sys.executable, "-m", "dataprep.publish", str(root), uri], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _refused(p, pattern):
    import re

    lines = p.stderr.strip().splitlines()  # progress lines of the verification, then the error
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert p.returncode == 1 and errors == lines[-1:] and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("damage", ["missing shard", "flipped byte", "flipped Lance byte"])
def test_a_damaged_dataset_is_refused_with_nothing_written(aws, pristine, tmp_path, damage):
    root = tmp_path / "ds"
    shutil.copytree(pristine, root)
    shard = root / "mds" / "train" / "chunk-00001" / "shard.00000.mds.zstd"
    if damage == "missing shard":
        shard.unlink()
        pattern = r"is damaged, nothing was published: mds/train/shard.00000.mds.zstd: missing|chunk-00001.*missing"
    else:
        f = shard if damage == "flipped byte" else sorted((root / "tokens.lance" / "data").iterdir())[1]
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        pattern = r"is damaged, nothing was published: .*(differs|damaged|cannot)"
    uri = f"s3://{BUCKET}/damaged-{damage.replace(' ', '-')}"
    _refused(_publish_cli(aws, root, uri), pattern)
    assert not list(object_store.list_objects(uri))  # not even the marker


def test_a_killed_second_split_publishes_only_committed_lance_versions(aws, pristine, tmp_path):
    """What a job killed in its second split leaves: Lance rows of the split appended (a version newer than
    the manifest's), state.json with the split unfinished. Publishing uploads the committed versions only."""
    import lance
    import pyarrow as pa

    root = tmp_path / "ds"
    shutil.copytree(pristine, root)
    committed = json.loads((root / "manifest.json").read_text())["commits"]["lance_version"]
    before = {str(p.relative_to(root)) for p in (root / "tokens.lance").rglob("*") if p.is_file()}
    table = lance.dataset(str(root / "tokens.lance")).to_table()
    val = table.slice(0, 4)
    val = val.set_column(val.schema.get_field_index("split"), "split", pa.array(["val"] * len(val)))
    val = val.set_column(val.schema.get_field_index("id"), "id",
                         pa.array([f"val-{i:08d}-{i % 2}" for i in range(len(val))]))
    lance.write_dataset(val, str(root / "tokens.lance"), mode="append")
    assert lance.dataset(str(root / "tokens.lance")).version == committed + 1
    uncommitted = {str(p.relative_to(root)) for p in (root / "tokens.lance").rglob("*") if p.is_file()} - before
    assert any("/data/" in f for f in uncommitted) and any("/_versions/" in f for f in uncommitted)
    (root / "state.json").write_text(json.dumps({"settings": {}, "lance_version": committed, "splits": {
        "train": {"run": {}, "chunks": {}, "complete": True}, "val": {"run": {}, "chunks": {}, "complete": False}}}))

    uri = f"s3://{BUCKET}/killed-split"
    p = _publish_cli(aws, root, uri)
    assert p.returncode == 0, p.stderr[-3000:]
    remote = {k for k, _ in object_store.list_objects(uri)}
    assert not remote & uncommitted, sorted(remote & uncommitted)
    assert {f for f in before if not f.endswith("latest_version_hint.json")} <= remote
    ds = TokenDataset(uri)
    assert ds.splits == ["train"] and len(ds.read_lance()["id"]) == 2 * N
    assert lance.dataset(f"{uri}/tokens.lance", storage_options=object_store.lance_options()).version == committed
