"""The sources of ``--data`` besides a local folder, without Ray: shard patterns, the shard listing (counts
per shard, never per image), the read task's records and failures, the ImageNet-val repacker, and every bad
source refused in one line by the real command before Ray starts."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataprep import listing as ls
from dataprep import pipeline, repack, sources
from dataprep.sources import patterns, shards
from support.source_shards import SHARD, parquet_bytes, shard_sources, source_folder, tar_bytes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    folder = source_folder(root / "folder")
    return {"root": root, "folder": folder, "patterns": shard_sources(folder, root)}


def test_patterns_expand_braces_and_globs(tmp_path):
    assert patterns.expand_braces("s-{0000..0002}.tar") == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    assert patterns.expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert patterns.expand_braces("x{y}z") == ["x{y}z"]
    assert patterns.base_of("s3://b/data/train-*.parquet") == "s3://b/data/"
    assert patterns.base_of("d/sub/imagenet1k-train-{0000..1023}.tar") == "d/sub/"
    for name in ("train-0.parquet", "train-1.parquet", "val-0.parquet"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train-2.parquet").write_bytes(b"x")
    base, found = patterns.match(f"{tmp_path}/train-*.parquet")  # '*' does not cross '/'
    assert base == f"{tmp_path}/" and [s.name for s in found] == ["train-0.parquet", "train-1.parquet"]
    assert found[0].size == 1 and found[0].mtime_ns > 0
    with pytest.raises(patterns.PatternError, match=r"/train-2.parquet: no such file \(one of the 2 shards"):
        patterns.match(f"{tmp_path}/train-{{1..2}}.parquet")
    with pytest.raises(patterns.PatternError, match="no shard matches"):
        patterns.match(f"{tmp_path}/test-*.parquet")
    assert patterns._regex("a-*.tar").match("a-1.tar") and not patterns._regex("a-*.tar").match("a-x/1.tar")
    old = [s.to_dict() for s in found]
    assert patterns.changed(old, found) is None
    grown = [patterns.Shard(found[0].name, "", 2, mtime_ns=found[0].mtime_ns), found[1]]
    assert patterns.changed(old, grown) == "train-0.parquet: size 1 -> 2"
    assert patterns.changed(old, found[:1]) == "train-1.parquet is gone"


def _records(listing):
    """Every record of a shard listing through the read task: [(index, path, label, reason, bytes)]."""
    out = []
    rows = listing.work_rows("train", ls.chunk_ranges(listing.num_images, 4), range(len(
        ls.chunk_ranges(listing.num_images, 4))), 2)
    for row in rows:
        for g in shards.read_chunk(row, **listing.read_kwargs()):
            blobs = pipeline._blobs(g)
            assert g["chunk"] == row["chunk"] and len(json.loads(g["items"])) <= 2
            out += [(*item, blob) for item, blob in zip(json.loads(g["items"]), blobs)]
    assert [r[0] for r in out] == list(range(listing.num_images))
    return out


def test_shard_listing_and_reads_match_the_folder(src):
    folder = ls.scan_folder(src["folder"], "train")
    for fmt, pattern in src["patterns"].items():
        names = ("--class-names", str(src["root"] / fmt / "classes.txt")) if fmt == "webdataset" else None
        listing = shards.list_source(fmt, pattern, {}, names_option=sources.read_class_names(names[1])
                                     if names else None)
        assert listing.classes == folder.classes  # from the Parquet metadata / the names file
        got = _records(listing)
        for it in folder.items:  # the same images, labels and order as the folder: index by index
            index, path, label, reason, blob = got[it.index]
            assert index == it.index and label == it.label and reason == ""
            assert blob == (src["folder"] / it.path).read_bytes(), path
        # image 5 is the first record of the second shard: SHARD#ROW, SHARD#KEY
        assert got[5][1] == {"parquet": "train-00001-of-00003.parquet#0", "webdataset": "train-0001.tar#img_01_001"}[fmt]
        assert listing.record()["shards"][0]["records"] == SHARD
        # the driver holds one entry per shard
        assert len(listing.shards) == len(listing.record()["shards"]) and not hasattr(listing, "items")


def test_bad_records_and_shards_become_failures(src):
    folder = ls.scan_folder(src["folder"], "train")
    n = len(folder.items)
    parquet = shards.list_source("parquet", src["patterns"]["parquet"], {})
    got = _records(parquet)
    assert [(p, lbl, r) for _, p, lbl, r, _ in got[n:]] == [
        ("train-zz-bad-labels.parquet#0", -1, "label missing"),
        ("train-zz-bad-labels.parquet#1", -1, "label 7 out of range 0..2"),
        ("train-zz-bad-labels.parquet#2", 1, "no image bytes (null)"),
        ("train-zz-truncated.parquet", -1, got[n + 3][3])]
    assert got[n + 3][3].startswith("unreadable shard: ") and "magic bytes" in got[n + 3][3]
    assert parquet.num_images == n + 4 and parquet.shards[-1].to_dict()["error"] == got[n + 3][3]

    wds = shards.list_source("webdataset", src["patterns"]["webdataset"], {}, num_classes=3)
    got = _records(wds)
    tail = [(p, r) for _, p, _, r, _ in got[n:]]
    assert tail[:3] == [("train-0003.tar#a", "label missing (no .cls member)"),
                        ("train-0003.tar#b", "label 9 out of range 0..2"), ("train-0003.tar#c", "")]
    assert tail[3][0] == "train-0003.tar" and tail[3][1].startswith("corrupt tar: no valid member header at byte")
    assert tail[4][0] == "train-0004.tar" and tail[4][1].startswith("unreadable shard: ReadError")
    assert tail[5] == ("train-0005.tar#e", "")
    assert tail[6] == ("train-0005.tar#f", "corrupt tar member: unexpected end of data")
    assert tail[7][0] == "train-0005.tar" and "unexpected end of data" in tail[7][1]
    assert wds.num_images == n + 8
    # ... and the decode stage fails the undecodable bytes (the folder's broken JPEG, here a Parquet row)
    row = {"split": "train", "chunk": 0, "items": json.dumps([[12, got[12][1], got[12][2], ""], [n + 2, "c", 1, ""]]),
           "data": got[12][4] + got[n + 2][4], "sizes": json.dumps([len(got[12][4]), len(got[n + 2][4])])}
    out = pipeline.decode_group(row, None, 16, ["center"])
    assert [e[3].split(":")[0] for e in json.loads(out["errors"])] == ["corrupt"]
    assert len(out["pixels"]) == 16 * 16 * 3


def test_a_shard_that_changed_since_listing_gives_failures_not_a_crash(src, tmp_path):
    """A local shard rewritten shorter after the listing: its missing records become failures."""
    path = tmp_path / "train-0000.parquet"
    jpeg = (src["folder"] / ls.scan_folder(src["folder"], "train").items[0].path).read_bytes()
    path.write_bytes(parquet_bytes([(jpeg, 0)] * 3))
    listing = shards.list_source("parquet", str(path), {}, num_classes=1)
    path.write_bytes(parquet_bytes([(jpeg, 0)]))
    got = _records(listing)
    assert [r[3] for r in got] == ["", *["train-0000.parquet holds fewer records than the 3 listed"] * 2]


def test_an_earlier_listing_is_reused_and_a_change_refused(src):
    parquet = shards.list_source("parquet", src["patterns"]["parquet"], {})
    rec = parquet.record()
    logs = []
    again = shards.list_source("parquet", src["patterns"]["parquet"], {}, prior=rec, log=logs.append)
    assert again.record() == rec and again.sha256() == parquet.sha256()
    assert "as recorded by the earlier run" in logs[-1]
    sources.check_unchanged(rec, again.record(), "train")
    moved = json.loads(json.dumps(rec))
    moved["shards"][1]["size"] += 1
    with pytest.raises(SystemExit, match=r"error: the source of split 'train' \(.*\) changed since it was started: "
                                         r"train-00001-of-00003.parquet: size \d+ -> \d+; use a new --out"):
        sources.check_unchanged(moved, rec, "train")
    with pytest.raises(SystemExit, match="image_column 'img' -> 'image'"):
        sources.check_unchanged({**rec, "image_column": "img"}, rec, "train")


def test_the_manifest_checks_its_sources_block():
    from shared.token_dataset import ManifestError, SplitCounts
    from shared.token_dataset.manifest import check_sources

    counts = {"train": SplitCounts(1, 1, 0, 1, {"0": 1}, True)}
    good = {"train": {"uri": "s3://b/x-*.tar", "format": "webdataset",
                      "shards": [{"name": "x-0.tar", "size": 3, "etag": "e", "records": 1, "error": None}]}}
    check_sources(good, counts, "manifest.json")
    for bad, what in [({"val": good["train"]}, "sources.val: no such split"),
                      ({"train": {"uri": "x", "format": "zip"}}, "must be an object with a uri and a format"),
                      ({"train": {**good["train"], "shards": [{"name": "x", "size": -1, "records": 1}]}}, "size")]:
        with pytest.raises(ManifestError, match=what):
            check_sources(bad, counts, "manifest.json")


def test_format_detection(src, tmp_path):
    def args(data, **kw):
        base = {"data": data, "file_list": None, "format": None, "image_column": None, "label_column": None,
                "image_key": None, "label_key": None, "class_names": None, "num_classes": None}
        return type("A", (), {**base, **kw})()

    assert sources.detect(args(str(src["folder"]))) is None  # a local folder: dataprep.listing
    assert sources.detect(args("s3://b/imagenet")) == "s3-folder"
    assert sources.detect(args("s3://b/d/train-*.parquet")) == "parquet"
    assert sources.detect(args("d/x-{0000..0009}.tar")) == "webdataset"
    assert sources.detect(args("s3://b/d/", format="parquet")) == "parquet"
    assert sources.pattern_of("s3://b/d/", "parquet") == "s3://b/d/*.parquet"
    for a, msg in [(args("d/*.zip"), "cannot tell the format of --data d/\\*.zip: give --format"),
                   (args("d/*.tar", format="parquet"), "names webdataset files, not --format parquet"),
                   (args("d/*.tar", image_column="img"), "--image-column goes with --format parquet, not webdataset"),
                   (args(str(src["folder"]), num_classes=3), "--num-classes goes with --format parquet or webdataset"),
                   (args("s3://b/x", file_list="l.tsv"), "--file-list lists local image files")]:
        with pytest.raises(SystemExit, match=msg):
            sources.detect(a)


def test_repack_the_imagenet_val_layout_into_every_format(src, tmp_path):
    """A flat folder and Kaggle's LOC_val_solution.csv -> a folder, Parquet, tars: the same records in the
    same (folder-listing) order, class names sorted as the train folders are."""
    flat = tmp_path / "val"
    flat.mkdir()
    items = ls.scan_folder(src["folder"], "train").items[:12]
    synsets = {0: "n02", 1: "n01", 2: "n03"}  # the label file's class names, not in label order
    lines = ["ImageId,PredictionString"]
    for k, it in enumerate(items):
        name = f"ILSVRC2012_val_{k + 1:08d}"
        (flat / f"{name}.JPEG").write_bytes((src["folder"] / it.path).read_bytes())
        lines.append(f"{name},{synsets[it.label]} 1 2 3 4 {synsets[it.label]} 5 6 7 8")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    outs = {}
    for to in repack.FORMATS:
        outs[to] = tmp_path / f"out-{to}"
        assert repack.main(["--images", str(flat), "--labels", str(tmp_path / "LOC_val_solution.csv"), "--split",
                            "val", "--to", to, "--out", str(outs[to]), "--shard-size", "5"]) == 0
    folder = ls.scan_folder(outs["folder"], "val")
    assert folder.classes == ["n01", "n02", "n03"] and len(folder.items) == 12
    expect = [((outs["folder"] / it.path).read_bytes(), it.label) for it in folder.items]
    assert (outs["parquet"] / "classes.txt").read_text().split() == folder.classes
    listing = shards.list_source("parquet", f"{outs['parquet']}/val-*.parquet", {})
    assert listing.classes == folder.classes and [(r[4], r[2]) for r in _records(listing)] == expect
    listing = shards.list_source("webdataset", f"{outs['webdataset']}/val-{{0000..0002}}.tar", {"image_keys": ["jpg"]},
                                 names_option=sources.read_class_names(str(outs["webdataset"] / "classes.txt")))
    assert [(r[4], r[2]) for r in _records(listing)] == expect
    assert _records(listing)[0][1] == "val-0000.tar#ILSVRC2012_val_00000005"  # n01 sorts first
    # an existing output is never replaced; an image without a label is one line
    with pytest.raises(SystemExit, match="already exists and is not a repacked image set"):
        repack.main(["--images", str(flat), "--labels", str(tmp_path / "LOC_val_solution.csv"), "--to", "folder",
                     "--out", str(outs["parquet"])])
    (flat / "extra.JPEG").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"1 images have no label in .* \(e.g. extra.JPEG\)"):
        repack.main(["--images", str(flat), "--labels", str(tmp_path / "LOC_val_solution.csv"), "--to", "folder",
                     "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


# --- bad sources: the real command, one line, before Ray --------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "ckpt"
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(path, extra={"weights": "raw"})  # the set is named: no warning
    return path


@pytest.mark.slow
def test_bad_sources_are_one_line_before_ray(src, tokenizer, tmp_path):
    (tmp_path / "wrong-columns.parquet").write_bytes(parquet_bytes([(b"x", 0)], image_column="img"))
    (tmp_path / "nolabels.tar").write_bytes(tar_bytes([("a.jpg", b"x"), ("b.jpg", b"y")]))
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "cls" / "notes.txt").write_text("no images here")
    cases = [
        ([f"{tmp_path}/nothing-*.parquet"], f"error: no shard matches {tmp_path}/nothing-\\*.parquet$"),
        ([str(tmp_path / "empty"), "--format", "parquet"], f"error: no shard matches {tmp_path}/empty/\\*.parquet$"),
        ([str(tmp_path / "empty")], "error: split 'train' lists no images$"),  # a folder without images
        ([str(tmp_path / "wrong-columns.parquet")], "error: wrong-columns.parquet: has no column 'image' \\(its "
                                                    "columns: img, label\\); give --image-column$"),
        ([str(tmp_path / "nolabels.tar"), "--num-classes", "2"],
         "error: nolabels.tar: none of its 2 samples has a .cls member \\(the labels\\); give --label-key$"),
        ([src["patterns"]["webdataset"]], "error: the webdataset source does not name its classes: give "
                                          "--class-names FILE"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    procs = [subprocess.Popen([sys.executable, str(REPO / "dataprep" / "encode.py"), "--data", *data, "--tokenizer",
                               str(tokenizer), "--out", str(tmp_path / f"out{k}"), "--resolution", "16"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for k, (data, _) in enumerate(cases)]
    for k, (p, (data, want)) in enumerate(zip(procs, cases)):
        out, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and re.search(want, lines[0]), (data, err[-2000:])
        assert not (tmp_path / f"out{k}").exists()
