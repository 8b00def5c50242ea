"""Integrity of a token dataset without Ray (datasets from the contract's own writer, ``write_dataset``):
``inspect_dataset --verify`` finds each kind of damage in either store and names it, readers see only
the committed Lance version, and the manifest's checksum block is validated."""
import datetime
import json
import re
import shutil
from pathlib import Path

import lance
import numpy as np
import pytest

from dataprep import inspect_dataset, verify
from shared import token_dataset as td
from shared.token_dataset import TokenDataset
from shared.token_dataset.writer import append_lance, lance_table
from support.synthetic_tokens import write_tokens

GRID, N, VIEWS = (4, 4), 30, ("center", "flip")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity") / "ds"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1 << 18, (N, 2, 16))
    write_tokens(root, {"train": (tokens, np.arange(N) % 3), "val": (tokens[:6], np.arange(6) % 3)}, grid=GRID,
                 num_classes=3, views=VIEWS, images_per_chunk=10, shard_bytes=1 << 10)  # 3 chunks, several shards
    return root


def _copy(clean, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(clean, out)
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _verify_cli(root, capsys):
    code = inspect_dataset.main([str(root), "--verify"])
    out, err = capsys.readouterr()
    return code, out, err


def test_clean_dataset_verifies_and_records_checksums(clean, capsys):
    m = td.read_manifest(clean)
    assert m.commits["lance_version"] == lance.dataset(td.lance_uri(clean)).version
    assert [c["chunk"] for c in m.commits["splits"]["train"]["chunks"]] == [0, 1, 2]
    index = json.loads((clean / "mds" / "train" / "index.json").read_text())
    assert all(len(s["zip_data"]["hashes"][td.MDS_HASH]) == 40 for s in index["shards"])
    code, out, err = _verify_cli(clean, capsys)
    assert code == 0 and err == "", out + err
    assert f"verified {clean}: {2 * (N + 6) * 2} rows of 2 splits" in out


def _damaged(root, capsys, *expect):
    rep = verify.verify(root)
    text = "\n".join(rep.problems)
    for pattern in expect:
        assert any(re.search(pattern, p) for p in rep.problems), (pattern, text)
    code, out, err = _verify_cli(root, capsys)
    assert code == 1
    assert err.strip().splitlines() == [f"error: {root}: {len(rep.problems)} problems found (listed above)"]
    assert out.count("damaged: ") == len(rep.problems)
    return rep


def test_deleted_mds_shard(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    shard = sorted((root / "mds" / "train" / "chunk-00001").glob("shard.*"))[0]
    index = json.loads((root / "mds" / "train" / "index.json").read_text())
    n = {s["zip_data"]["basename"]: s["samples"] for s in index["shards"]}[f"chunk-00001/{shard.name}"]
    shard.unlink()
    views = len(json.loads((root / "manifest.json").read_text())["views"])
    _damaged(root, capsys, rf"mds/train/chunk-00001/{shard.name}: missing \({n} images: {n * views} rows\)",
             r"mds/train: split 'train' chunk 1 \(images 10..19\) differs from its checksum; rows missing: "
             r"train-00000010-0",
             rf"split 'train': the two stores disagree \(only in Lance {n * views}: ")


def test_deleted_mds_index(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    (root / "mds" / "val" / "index.json").unlink()
    rep = _damaged(root, capsys, r"mds/val/index.json: missing")
    assert len(rep.problems) == 1  # the shards themselves were still checked through the chunk indexes


def test_flipped_bytes_in_an_mds_shard(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    shard = sorted((root / "mds" / "train" / "chunk-00002").glob("shard.*"))[1]
    _flip(shard, shard.stat().st_size // 2)
    rep = verify.verify(root)
    assert f"mds/train/chunk-00002/{shard.name}: sha1 differs from index.json (damaged)" in rep.problems, rep.problems
    _damaged(root, capsys, rf"mds/train/chunk-00002/{shard.name}: sha1 differs")


def test_flipped_bytes_in_a_lance_data_file(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    data = sorted((root / "tokens.lance" / "data").glob("*.lance"))[0]
    before = TokenDataset(clean).read_lance()
    _flip(data, 0)  # anywhere: the file's checksum tells
    _damaged(root, capsys, rf"tokens.lance/data/{data.name}: sha256 differs from the manifest")
    _flip(data, 0)
    # A flip inside the token bytes: Lance reads it back without complaint, the row checksums name the rows.
    for offset in range(data.stat().st_size // 4, data.stat().st_size, 5):
        _flip(data, offset)
        try:
            after = TokenDataset(root).read_lance()
            if after["id"] == before["id"] and not np.array_equal(after["tokens"], before["tokens"]):
                break
        except (OSError, ValueError):  # a flip in a page header or a string column: Lance refuses to read it
            pass
        _flip(data, offset)
    else:
        pytest.fail("no byte of the data file holds token bytes")
    changed = [rid for i, rid in enumerate(before["id"]) if not np.array_equal(after["tokens"][i], before["tokens"][i])]
    _damaged(root, capsys, rf"tokens.lance/data/{data.name}: sha256 differs from the manifest",
             rf"tokens.lance \(version \d+\): split '\w+' chunk \d \(images .*\) differs from its checksum; rows "
             rf"changed: .*{changed[0]}", rf"different label/view/tokens \d+: .*{changed[0]}")


def test_dropped_lance_rows(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    ds = lance.dataset(td.lance_uri(root))
    ds.delete("id = 'train-00000003-1' OR id = 'val-00000002-0'")
    # Readers keep the committed version ...
    assert "train-00000003-1" in TokenDataset(root).read_lance()["id"]
    _damaged(root, capsys, r"tokens.lance: version \d+ is newer than the committed version \d+ and no split is "
                           r"being written: changes made outside dataprep")
    # ... and once the committed version itself is gone, nothing reads as if it were complete.
    lance.dataset(td.lance_uri(root)).cleanup_old_versions(older_than=datetime.timedelta(0))
    _damaged(root, capsys, r"tokens.lance: cannot open version \d+")


def test_rows_missing_from_a_lance_fragment(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    files = sorted((root / "tokens.lance" / "data").glob("*.lance"))
    files[-1].unlink()
    _damaged(root, capsys, rf"tokens.lance/data/{files[-1].name}: missing", r"tokens.lance \(version \d+\): cannot "
                                                                           r"read its rows")


def test_readers_see_only_the_committed_version(clean, tmp_path, capsys):
    """Rows appended after the manifest (a split being encoded, a killed job) are not the dataset's."""
    root = _copy(clean, tmp_path)
    ds = TokenDataset(root)
    schema = ds.lance().schema
    packing = ds.packing
    extra = [{"id": td.row_id("test", i, 0), "split": "test", "path": f"x/{i}", "label": 0, "view": 0,
              "tokens": packing.encode(np.zeros(16, np.int64))} for i in range(5)]
    append_lance(root, lance_table(extra, schema))
    (root / "state.json").write_text(json.dumps({"settings": {}, "lance_version": None, "splits": {
        "test": {"run": {}, "chunks": {}, "complete": False}}}))  # a split started and not finished
    fresh = TokenDataset(root)
    assert fresh.read_lance()["id"] == TokenDataset(clean).read_lance()["id"]
    assert inspect_dataset.summarize(fresh)["lance_rows"] == 2 * (N + 6)
    rep = verify.verify(root)
    assert rep.ok, rep.problems
    assert any("a split was started and not finished" in n for n in rep.notes), rep.notes


def test_commits_block_is_validated(clean, tmp_path):
    good = json.loads((clean / "manifest.json").read_text())
    commits = good["commits"]
    chunk = commits["splits"]["train"]["chunks"][0]
    cases = [
        ({**commits, "lance_version": None}, "lance_version is null, but the counts hold rows"),
        ({**commits, "splits": {"train": commits["splits"]["train"]}}, "must name the splits of counts"),
        ({**commits, "splits": {**commits["splits"], "train": {**commits["splits"]["train"], "chunks": [
            {**chunk, "rows": chunk["rows"] + 1}] + commits["splits"]["train"]["chunks"][1:]}}}, "chunks hold"),
        ({**commits, "splits": {**commits["splits"], "train": {**commits["splits"]["train"], "chunks": [
            chunk, chunk]}}}, "chunk 0 is listed twice"),
        ({**commits, "lance_files": {"x.lance": "nope"}}, "must be 64 hex digits"),
    ]
    for bad, what in cases:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, "commits": bad}))
        with pytest.raises(td.ManifestError, match=what) as e:
            td.read_manifest(tmp_path)
        assert "\n" not in str(e.value)
    older = {k: v for k, v in good.items() if k != "commits"}  # a dataset from before the block: still read
    (tmp_path / "manifest.json").write_text(json.dumps(older))
    assert td.read_manifest(tmp_path).commits is None


def test_inspect_refuses_in_one_line(clean, tmp_path, capsys):
    def refused(argv):
        with pytest.raises(SystemExit) as e:
            inspect_dataset.main([str(a) for a in argv])
        msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
        assert e.value.code not in (0, None) and len(msg.strip().splitlines()) == 1, msg
        assert msg.startswith("error: "), msg
        return msg.strip()

    assert refused([clean, "--split", "test"]) == f"error: {clean} has no split 'test' (it has train, val)"
    assert "argument --rows: expected a number >= 0, got -1" in refused([clean, "--rows", "-1"])
    assert refused([tmp_path, "--verify"]) == f"error: {tmp_path} is not a token dataset: manifest.json is missing"
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "tok")  # not the (synthetic) dataset's tokenizer
    assert refused([clean, "--tokenizer", tmp_path / "tok", "--grid", tmp_path / "g.png"]) == \
        f"error: --tokenizer {tmp_path / 'tok'} is not the tokenizer this dataset was made with (sha256 differs)"
    assert "model.safetensors" in refused([clean, "--tokenizer", tmp_path / "nothing", "--grid", tmp_path / "g.png"])
    root = _copy(clean, tmp_path)
    sorted((root / "tokens.lance" / "data").glob("*.lance"))[-1].unlink()
    assert refused([root]).endswith("; run with --verify") and "cannot read" in refused([root])
