"""The Ray job end to end on CPU with an embedded, tightly capped Ray: image folder (real photos plus one
file of each awkward kind) -> Lance + MDS -> readers give exactly the tokens the tokenizer computes
in-process; a run killed mid-commit and resumed equals the uninterrupted one; rerunning is a no-op."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ray

from dataprep import encode, images, inspect_dataset, listing  # noqa: E402
from dataprep.sample_images import image_folder  # noqa: E402
from support.fixtures_images import bad_files  # noqa: E402
from shared.token_dataset import TokenDataset, row_id  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RES, BATCH, CHUNK, VIEWS = 32, 3, 8, "center,flip"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("dataprep")
    data = tmp / "data"
    image_folder(data, classes=3, per_class=4)
    bad = bad_files(data / "train" / "class_03")
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp / "ckpt")
    ray.init(address="local", num_cpus=2, object_store_memory=100 << 20, include_dashboard=False,
             configure_logging=False)
    try:
        yield {"tmp": tmp, "data": data, "ckpt": tmp / "ckpt", "bad": bad}
    finally:
        ray.shutdown()


def _args(w, out):
    return ["--data", str(w["data"]), "--split", "train", "--tokenizer", str(w["ckpt"]), "--out", str(out),
            "--resolution", str(RES), "--views", VIEWS, "--batch-size", str(BATCH), "--chunk-size", str(CHUNK),
            "--actors", "1"]


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["tmp"] / "full"
    assert encode.main(_args(world, out)) == 0
    return out


def _reference(world):
    """Tokens computed in-process: same crops, same batch composition (groups of BATCH within a chunk)."""
    from stage1_tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(world["ckpt"])
    lst = listing.scan_folder(world["data"], "train")
    views = images.expand_views(VIEWS)
    ref, failed = {}, {}
    for lo, hi in listing.chunk_ranges(len(lst.items), CHUNK):
        for group in listing.groups(lst.items[lo:hi], BATCH):
            ok, crops = [], []
            for it in group:
                try:
                    crops.append(images.load_views(world["data"] / it.path, RES, views))
                    ok.append(it)
                except images.BadImage as e:
                    failed[it.path] = str(e)
            if not ok:
                continue
            t = tok.encode(images.to_model_input(np.concatenate(crops))).reshape(len(ok) * len(views), 16, 16)
            for i, it in enumerate(ok):
                for v in range(len(views)):
                    ref[row_id("train", it.index, v)] = (it.label, it.path, t[i * len(views) + v].numpy())
    return ref, failed


def test_round_trip_tokens_equal_in_process_encoding(world, uninterrupted, tmp_path):
    ref, failed = _reference(world)
    ds = TokenDataset(uninterrupted)  # validates the manifest; the checks below read the file itself
    m = json.loads((uninterrupted / "manifest.json").read_text())
    assert m["classes"] == ["class_00", "class_01", "class_02", "class_03"] and m["num_classes"] == 4
    assert m["grid"] == [16, 16] and m["tokens_per_image"] == 256 and m["subtoken_bits"] == [6, 12]
    assert m["tokenizer"]["preset"] == "tokenizer-tiny" and len(m["tokenizer"]["checkpoint_sha256"]) == 64
    n_bad = sum(1 for v in world["bad"].values() if v != "ok")
    assert m["failures"] == n_bad == len(failed)
    c = m["counts"]["train"]
    assert c["images"] == 12 + len(world["bad"]) and c["encoded_images"] == c["images"] - n_bad
    assert c["rows"] == 2 * c["encoded_images"] == len(ref)
    assert c["per_class"] == {"0": 4, "1": 4, "2": 4, "3": len(world["bad"]) - n_bad}

    lance_rows = ds.read_lance(split="train")
    assert lance_rows["id"] == sorted(ref)
    for i, rid in enumerate(lance_rows["id"]):
        label, path, tokens = ref[rid]
        assert (lance_rows["label"][i], lance_rows["path"][i]) == (label, path)
        assert lance_rows["view"][i] == int(rid[-1])
        np.testing.assert_array_equal(lance_rows["tokens"][i], tokens, err_msg=rid)
    mds = ds.read_mds("train", tmp_path / "cache")
    assert mds["id"] == lance_rows["id"] and mds["label"] == lance_rows["label"]
    np.testing.assert_array_equal(mds["tokens"], lance_rows["tokens"])
    # failures table: every bad file with its reason
    lines = (uninterrupted / "failures-train.tsv").read_text().splitlines()[1:]
    got = {p: r for _, p, r in (ln.split("\t") for ln in lines)}
    assert got == failed
    for name, outcome in world["bad"].items():
        if outcome != "ok":
            assert got[f"train/class_03/{name}"].startswith(outcome)
    # Lance queries: filter by class, take by id
    assert len(ds.read_lance(filter="label = 1")["id"]) == 8
    one = ds.take([lance_rows["id"][5]])
    np.testing.assert_array_equal(one["tokens"][0], lance_rows["tokens"][5])
    # inspect: counts, usage, sizes, provenance, decoded grid
    info = inspect_dataset.summarize(ds)
    assert info["lance_rows"] == len(ref) and info["provenance"]["lance_schema_matches_manifest"]
    assert 0 < info["codebook_usage"]["distinct_tokens"] <= len(ref) * 256
    assert inspect_dataset.main([str(uninterrupted), "--grid", str(tmp_path / "g.png"), "--rows", "4"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 2 * RES


def test_kill_and_resume_equals_uninterrupted(world, uninterrupted, tmp_path, capsys):
    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    address = ray.get_runtime_context().gcs_address
    # A separate process exits hard (os._exit) inside the second commit, after its Lance append.
    proc = subprocess.run([sys.executable, str(REPO / "dataprep" / "encode.py"), *_args(world, out),
                           "--address", address, "--_crash-at", "2:lance"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == encode.CRASH_EXIT == 17, proc.stderr[-3000:]
    st = json.loads((out / "state.json").read_text())
    assert list(st["splits"]["train"]["chunks"]) == ["0"]  # chunk 1 reached MDS + Lance, not the record
    assert (out / "mds" / "train" / "chunk-00001").is_dir()
    assert not (out / "manifest.json").exists()

    assert encode.main(_args(world, out)) == 0
    a, b = TokenDataset(uninterrupted), TokenDataset(out)
    ra, rb = a.read_lance(), b.read_lance()
    assert ra["id"] == rb["id"] and ra["path"] == rb["path"] and ra["label"] == rb["label"]
    np.testing.assert_array_equal(ra["tokens"], rb["tokens"])
    assert len(set(rb["id"])) == len(rb["id"])
    ma, mb = a.read_mds("train", tmp_path / "ca"), b.read_mds("train", tmp_path / "cb")
    assert ma["id"] == mb["id"]
    np.testing.assert_array_equal(ma["tokens"], mb["tokens"])
    assert a.manifest.counts == b.manifest.counts
    assert (uninterrupted / "failures-train.tsv").read_text() == (out / "failures-train.tsv").read_text()
    assert sorted(p.name for p in (out / "mds" / "train").iterdir()) == \
        sorted(p.name for p in (uninterrupted / "mds" / "train").iterdir())

    capsys.readouterr()
    assert encode.main(_args(world, out)) == 0  # finished: a no-op that says so
    assert "nothing to do" in capsys.readouterr().out
    assert TokenDataset(out).read_lance()["id"] == rb["id"]


def test_tencrop_views_through_ray_from_a_file_list(world, tmp_path):
    """LlamaGen's ten-crop through the Ray job, images given as a file list: every (image, view) row holds
    exactly the tokens of the same ten crops encoded in-process in one batch."""
    from stage1_tokenizer.tokenizer import Tokenizer

    paths = [f"train/class_0{c}/{p.name}" for c in range(2)
             for p in sorted((world["data"] / "train" / f"class_0{c}").iterdir())[:2]]
    flist = tmp_path / "list.tsv"
    flist.write_text("".join(f"{p}\t{i // 2}\n" for i, p in enumerate(paths)))
    out = tmp_path / "ten"
    assert encode.main(["--data", str(world["data"]), "--file-list", str(flist), "--split", "train",
                        "--tokenizer", str(world["ckpt"]), "--out", str(out), "--resolution", str(RES),
                        "--views", "tencrop", "--batch-size", "4", "--chunk-size", "4", "--actors", "1"]) == 0
    views = images.expand_views("tencrop")
    assert len(views) == 10
    tok = Tokenizer.from_checkpoint(world["ckpt"])
    crops = np.concatenate([images.load_views(world["data"] / p, RES, views) for p in sorted(paths)])
    expect = tok.encode(images.to_model_input(crops)).reshape(len(paths), 10, 16, 16).numpy()
    rows = TokenDataset(out).read_lance(split="train")
    assert len(rows["id"]) == 10 * len(paths)
    for i, p in enumerate(sorted(paths)):
        assert [rows["view"][j] for j in range(len(rows["id"])) if rows["path"][j] == p] == list(range(10))
        for j in range(len(rows["id"])):
            if rows["path"][j] == p:
                assert rows["label"][j] == paths.index(p) // 2
                np.testing.assert_array_equal(rows["tokens"][j], expect[i, rows["view"][j]])
    # the ten crops really differ (corners vs centre vs mirrors), so the check above is not vacuous
    assert len({c.tobytes() for c in crops[:10]}) == 10


def _crash_run(world, args, point):
    """The job in its own process, exiting hard (os._exit, like a kill) at ``point``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "dataprep" / "encode.py"), *args, "--address",
                           ray.get_runtime_context().gcs_address, "--_crash-at", point], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == encode.CRASH_EXIT, proc.stderr[-3000:]


def test_verify_a_real_dataset(uninterrupted, tmp_path, capsys):
    from dataprep import verify

    m = json.loads((uninterrupted / "manifest.json").read_text())
    chunks = m["commits"]["splits"]["train"]["chunks"]
    assert [c["chunk"] for c in chunks] == list(range(len(listing.chunk_ranges(m["counts"]["train"]["images"], CHUNK))))
    assert sum(c["rows"] for c in chunks) == m["counts"]["train"]["rows"]
    assert inspect_dataset.main([str(uninterrupted), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    root = tmp_path / "copy"
    shutil.copytree(uninterrupted, root)
    shard = sorted((root / "mds" / "train").glob("chunk-00000/shard.*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert inspect_dataset.main([str(root), "--verify"]) == 1
    assert f"damaged: mds/train/chunk-00000/{shard.name}: sha1 differs" in capsys.readouterr().out
    assert not verify.verify(uninterrupted).problems


def test_half_written_second_split_is_not_read(world, uninterrupted, tmp_path):
    """A second split killed mid-way: readers, inspect and verify see exactly the first one, whose
    dataset the Lance table's newer versions do not change; running the command again finishes it."""
    import lance

    from dataprep import verify

    out = tmp_path / "two"
    shutil.copytree(uninterrupted, out)
    vdata = tmp_path / "vdata"
    shutil.copytree(world["data"] / "train", vdata / "val")
    val = _args(world, out)
    val[val.index("--data") + 1], val[val.index("--split") + 1] = str(vdata), "val"
    _crash_run(world, val, "2:state")  # two val chunks committed (in state.json), then killed
    st = json.loads((out / "state.json").read_text())
    assert sorted(st["splits"]["val"]["chunks"]) == ["0", "1"] and not st["splits"]["val"]["complete"]
    assert lance.dataset(str(out / "tokens.lance")).count_rows() > TokenDataset(uninterrupted).manifest.counts[
        "train"].rows  # the val rows are on disk ...

    ds, ref = TokenDataset(out), TokenDataset(uninterrupted)  # ... and not in the dataset
    assert ds.splits == ["train"]
    rows, ref_rows = ds.read_lance(), ref.read_lance()
    assert rows["id"] == ref_rows["id"]
    np.testing.assert_array_equal(rows["tokens"], ref_rows["tokens"])
    info, ref_info = inspect_dataset.summarize(ds), inspect_dataset.summarize(ref)
    assert info["lance_rows"] == ref_info["lance_rows"] and info["codebook_usage"] == ref_info["codebook_usage"]
    rep = verify.verify(out)
    assert rep.ok, rep.problems
    assert any("a split was started and not finished" in n for n in rep.notes), rep.notes

    assert encode.main(val) == 0
    done = TokenDataset(out)
    assert done.splits == ["train", "val"] and done.manifest.counts["val"].complete
    assert done.read_lance(split="train")["id"] == ref_rows["id"]
    assert done.manifest.counts["val"].rows == ref.manifest.counts["train"].rows
    rep = verify.verify(out)
    assert rep.ok and not rep.notes, (rep.problems, rep.notes)
    assert len(done.lance().versions()) == 1


def test_kill_after_complete_is_tidied_on_the_next_start(world, uninterrupted, tmp_path, capsys):
    """Killed right after recording the split complete (before its manifest and clean-up): the next run
    finishes the clean-up instead of leaving every per-chunk version behind. The data folder also holds
    a file whose name is not UTF-8: one failures-table entry, not a crash."""
    from dataprep import stores, verify

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    good = sorted((data / "train" / "class_00").iterdir())[0]
    shutil.copy(good, os.path.join(os.fsencode(data / "train" / "class_00"), b"zz-caf\xe9.png"))
    out = tmp_path / "ds"
    args = _args(world, out)
    args[args.index("--data") + 1] = str(data)
    _crash_run(world, args, "1:complete")
    assert json.loads((out / "state.json").read_text())["splits"]["train"]["complete"]
    assert not (out / "manifest.json").exists()
    assert len(stores.LanceStore(out).dataset().versions()) > 2  # one per chunk, plus the compaction

    capsys.readouterr()
    assert encode.main(args) == 0
    assert "already complete" in capsys.readouterr().out
    ds = TokenDataset(out)
    assert len(ds.lance().versions()) == 1
    lance_bytes = {r: TokenDataset(r).bytes_per_token()["lance"]["bytes_per_token"] for r in (out, uninterrupted)}
    assert lance_bytes[out] <= 1.05 * lance_bytes[uninterrupted], lance_bytes
    assert verify.verify(out).ok
    lines = (out / "failures-train.tsv").read_text().splitlines()
    assert "train\ttrain/class_00/zz-caf\\xe9.png\tfile name is not valid UTF-8" in lines
    c = ds.manifest.counts["train"]
    assert c.images == TokenDataset(uninterrupted).manifest.counts["train"].images + 1
    assert c.failed_images == TokenDataset(uninterrupted).manifest.counts["train"].failed_images + 1
    capsys.readouterr()
    assert encode.main(args) == 0 and len(TokenDataset(out).lance().versions()) == 1  # idempotent
    assert "nothing to do" in capsys.readouterr().out
