"""dataprep without Ray: image decoding of awkward files, crops, the input listing, the two stores, the
commit/rollback logic, provenance refusal and the bytes-per-token budget."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataprep import encode, images, listing, state, stores
from dataprep.sample_images import image_folder, photos
from support.fixtures_images import bad_files
from shared import token_dataset as td
from shared.token_dataset import TokenDataset
from shared.token_dataset.writer import lance_schema, lance_table, write_mds_chunk
from shared.tokens import pack_tokens, split_index, unpack_tokens


# --- images ---------------------------------------------------------------------------------------------

def test_bad_files_convert_or_fail_with_reason(tmp_path):
    expect = bad_files(tmp_path)
    assert len(expect) >= 14
    for name, outcome in expect.items():
        if outcome == "ok":
            v = images.load_views(tmp_path / name, 32, ["center", "flip"])
            assert v.shape == (2, 32, 32, 3) and v.dtype == np.uint8, name
        else:
            with pytest.raises(images.BadImage) as e:
                images.load_views(tmp_path / name, 32, ["center"])
            assert str(e.value).startswith(outcome), (name, str(e.value))


def test_conversions_keep_pixel_values(tmp_path):
    # CMYK all-zero ink is white; a fully transparent pixel composites onto white; 16-bit scales to 8-bit.
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    assert np.abs(np.asarray(images.load_rgb(tmp_path / "c.jpg")).astype(int) - 255).max() <= 2
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (10, 20, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    px = np.asarray(images.load_rgb(tmp_path / "a.png"))
    assert (px[:4] == (10, 20, 30)).all() and (px[4:] == 255).all()
    g16 = np.array([[0, 257 * 128, 65535, 1000]] * 2, dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g.png")
    assert images.describe(tmp_path / "g.png")[0].startswith("I")
    px = np.asarray(images.load_rgb(tmp_path / "g.png"))
    assert px.shape == (2, 4, 3) and px[0, :, 0].tolist() == [0, 128, 255, round(1000 / 257)]
    assert (px[..., 0] == px[..., 2]).all()


def test_too_large_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 64 * 64 - 1)
    with pytest.raises(images.BadImage, match="too large"):
        images.load_rgb(tmp_path / "big.png")
    # PIL's own bomb refusal (above twice its limit) is reported the same way
    monkeypatch.setattr(images, "MAX_PIXELS", 1 << 28)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(images.BadImage, match="too large"):
        images.load_rgb(tmp_path / "big.png")


def test_views_match_plain_pil_crops():
    a = photos()["astronaut"][40:340, :]  # 300 x 512, landscape
    img = Image.fromarray(a)
    v = images.make_views(img, 64, images.expand_views("center,flip,tencrop"))
    assert v.shape == (12, 64, 64, 3)
    # centre: box-halve 300x512 -> 150x256 (>= 2*64), again -> 75x128, then bicubic to 64 x round(128*64/75)
    small = img.resize((256, 150), Image.BOX).resize((128, 75), Image.BOX).resize((109, 64), Image.BICUBIC)
    ref = np.asarray(small.crop((22, 0, 86, 64)))
    assert np.array_equal(v[0], ref)
    assert np.array_equal(v[1], v[0][:, ::-1])
    # ten-crop: 12 views in order; flipped halves mirror the first five
    names = images.expand_views("tencrop")
    assert names[:5] == ["ten-tl", "ten-tr", "ten-bl", "ten-br", "ten-c"]
    for k in range(5):
        assert np.array_equal(v[2 + 5 + k], v[2 + k][:, ::-1])
    assert not np.array_equal(v[2], v[3])  # corners differ
    with pytest.raises(ValueError, match="unknown view"):
        images.expand_views("center,zoom")


def test_model_input_range():
    x = images.to_model_input(np.array([[[[0, 255, 127]]]], np.uint8))
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1])


# --- listing -------------------------------------------------------------------------------------------

def test_scan_folder_labels_and_listing(tmp_path):
    for cls in ("n02", "n01", "n10"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for f in ("b.JPEG", "a.jpeg", "readme.txt"):
            (tmp_path / "train" / cls / f).write_bytes(b"x")
    lst = listing.scan_folder(tmp_path, "train")
    assert lst.classes == ["n01", "n02", "n10"] and lst.ignored == 3
    assert [(i.index, i.path, i.label) for i in lst.items[:3]] == [
        (0, "train/n01/a.jpeg", 0), (1, "train/n01/b.JPEG", 0), (2, "train/n02/a.jpeg", 1)]
    h = lst.sha256()
    (tmp_path / "train" / "n10" / "c.jpg").write_bytes(b"x")
    assert listing.scan_folder(tmp_path, "train").sha256() != h
    with pytest.raises(listing.ListingError):
        listing.scan_folder(tmp_path, "val")


def test_file_list(tmp_path):
    f = tmp_path / "list.tsv"
    f.write_text("# comment\nb/x.jpg\t2\na/y.png\t0\n\n")
    lst = listing.read_file_list(f)
    assert [(i.path, i.label) for i in lst.items] == [("a/y.png", 0), ("b/x.jpg", 2)]
    assert lst.classes == ["0", "1", "2"]
    f.write_text("a.jpg 3\n")
    with pytest.raises(listing.ListingError, match="path<TAB>label"):
        listing.read_file_list(f)
    f.write_text("a.jpg\tcat\n")
    with pytest.raises(listing.ListingError, match="not an integer"):
        listing.read_file_list(f)


def test_chunks_and_groups():
    assert listing.chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    items = [listing.Item(i, f"{i}.jpg", 0) for i in range(7)]
    assert [[i.index for i in g] for g in listing.groups(items, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert td.row_id("val", 12, 1) == "val-00000012-1"


# --- writers, commit record, recovery --------------------------------------------------------------------

def _settings(grid=(4, 4), **kw):
    s = {"format": td.FORMAT, "version": td.VERSION, "grid": list(grid), "bits_per_token": 18,
         "bit_order": "little-endian-channel", "subtoken_bits": [6, 12], "classes": ["a", "b", "c"],
         "resolution": 8, "views": ["center"], "precision": "fp32",
         "tokenizer": {"preset": "tokenizer-tiny", "config": {}, "checkpoint_sha256": "0" * 64}}
    s.update(kw)
    return s


def _rows(split, lo, hi, rng, n_tokens=16):
    out = []
    for i in range(lo, hi):
        t = rng.integers(0, 1 << 18, n_tokens)
        out.append({"index": i, "id": td.row_id(split, i, 0), "path": f"{split}/{i}.jpg", "label": i % 3,
                    "view": 0, "tokens": pack_tokens(t).tobytes(), "error": "", "_tok": t})
    return out


def test_commit_crash_debris_is_rolled_back(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    root.mkdir()
    s = _settings()
    st = state.State.new(root, s)
    st.start_split("train", {"num_images": 10})
    schema = lance_schema(td.Packing(18, 16), s)
    rows0, rows1, rows2 = _rows("train", 0, 4, rng), _rows("train", 4, 8, rng), _rows("train", 8, 9, rng)
    rows1[1] = {**rows1[1], "view": -1, "tokens": b"", "error": "corrupt: broken"}
    encode.commit_chunk(root, st, "train", 0, list(rows0), 4, schema, 1)
    encode.commit_chunk(root, st, "train", 1, list(rows1), 4, schema, 1)
    committed_version = st.lance_version
    # A killed run: chunk 2 reached MDS and Lance, but not the record.
    write_mds_chunk(root, "train", 2, rows2, 1)
    stores.LanceStore(root).append(lance_table([{**r, "split": "train"} for r in rows2], schema))
    assert stores.LanceStore(root).dataset().count_rows() == 8
    st2 = state.State.load(root)
    assert sorted(st2.committed("train")) == [0, 1] and st2.lance_version == committed_version
    encode.recover(root, st2, "train")
    assert stores.LanceStore(root).dataset().count_rows() == 7
    assert not (td.mds_split_dir(root, "train") / "chunk-00002").exists()
    # Resume commits chunk 2 once, then a chunk whose only image failed; finalize merges and compacts.
    encode.commit_chunk(root, st2, "train", 2, list(rows2), 1, schema, 1)
    dead = {**_rows("train", 9, 10, rng)[0], "view": -1, "tokens": b"", "error": "not an image"}
    encode.commit_chunk(root, st2, "train", 3, [dead], 1, schema, 1)
    m = encode.finalize(root, st2, "train")
    assert m["counts"]["train"]["encoded_images"] == 8 and m["failures"] == 2
    assert m["counts"]["train"]["per_class"] == {"0": 3, "1": 3, "2": 2}
    ds = TokenDataset(root)
    got = ds.read_lance(split="train")
    good = [r for r in rows0 + rows1 + rows2 if r["view"] == 0]
    assert got["id"] == [r["id"] for r in good]
    assert np.array_equal(got["tokens"].reshape(len(good), -1), np.stack([r["_tok"] for r in good]))
    mds = ds.read_mds("train", tmp_path / "cache")
    assert mds["id"] == got["id"] and np.array_equal(mds["tokens"], got["tokens"])
    assert mds["label"] == got["label"]
    pre, post = ds.subtokens(got["tokens"])
    assert np.array_equal(pre, got["tokens"] & 63) and np.array_equal(post, got["tokens"] >> 6)
    assert ds.provenance() == s
    assert (root / "failures-train.tsv").read_text().splitlines()[1] == "train\ttrain/5.jpg\tcorrupt: broken"
    assert len(ds.lance().versions()) == 1  # old versions and debris cleaned after compaction


def test_rollback_to_nothing_removes_table(tmp_path):
    store = stores.LanceStore(tmp_path)
    schema = lance_schema(td.Packing(18, 16), _settings())
    store.append(lance_table([{**r, "split": "t"} for r in _rows("t", 0, 2, np.random.default_rng(1))],
                             schema))
    assert store.exists() and store.rollback(None) and not store.exists()


def test_provenance_mismatch_refused_and_finished_is_noop(tmp_path, capsys):
    data = tmp_path / "img"
    image_folder(data, classes=2, per_class=1)
    ckpt = tmp_path / "ckpt"
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(ckpt)
    out = tmp_path / "ds"
    args = ["--data", str(data), "--tokenizer", str(ckpt), "--out", str(out), "--resolution", "16",
            "--chunk-size", "1"]
    ns = encode.parse_args(args)
    lst = listing.scan_folder(data, "train")
    tok = encode.load_tokenizer(ckpt)
    st = state.State.new(out, encode.settings_for(ns, tok, lst.classes, ["center", "flip"]))
    st.save()
    st.start_split("train", {"num_images": 2, "listing_sha256": lst.sha256(), "chunk_size": 1,
                             "batch_size": 32, "source": "folder"})
    st.save()  # start_split registers in memory; the job saves once it is sure to run
    with pytest.raises(SystemExit, match="other settings.*resolution: 16 -> 32"):
        encode.main(args[:-4] + ["--resolution", "32", "--chunk-size", "1"])
    torch.manual_seed(1)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "other")
    with pytest.raises(SystemExit, match="checkpoint_sha256"):
        encode.main(args[:3] + [str(tmp_path / "other")] + args[4:])
    with pytest.raises(SystemExit, match="split 'train'.*chunk_size: 1 -> 2"):
        encode.main(args[:-1] + ["2"])
    with pytest.raises(SystemExit, match="not a checkpoint"):
        encode.main(args[:3] + [str(tmp_path / "nope")] + args[4:])
    # A finished split: the same command does nothing (no Ray is started: nothing to encode).
    for c in range(2):  # the record two committed one-image chunks leave (the manifest is rebuilt from it)
        st.data["splits"]["train"]["chunks"][str(c)] = {"images": 1, "encoded": 1, "rows": 2, "failures": [],
                                                        "per_class": {str(c): 1}}
    st.data["splits"]["train"]["complete"] = True
    st.save()
    assert encode.main(args) == 0
    assert "already complete (2 encoded, 0 failed)" in capsys.readouterr().out
    # A directory that holds something else is not taken over.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        encode.main(args[:5] + [str(tmp_path / "junk")] + args[6:])


def test_bytes_per_token_budget_with_real_tokens(tmp_path):
    """Both stores stay <= 2.3 bytes/token on tokenizer output at scale (overhead included)."""
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer(PRESETS["tokenizer-tiny"]).eval()
    rng = np.random.default_rng(0)
    pics = list(photos().values())
    crops = []
    for i in range(1200):  # 32x32 random crops of real photos -> 16x16 = 256 tokens each
        a = pics[i % len(pics)]
        y, x = rng.integers(0, a.shape[0] - 32), rng.integers(0, a.shape[1] - 32)
        crops.append(a[y:y + 32, x:x + 32, :3] if a.ndim == 3 else np.repeat(a[y:y + 32, x:x + 32, None], 3, 2))
    with torch.no_grad():
        idx = tok.encode(images.to_model_input(np.stack(crops))).reshape(len(crops), -1).numpy()
    root = tmp_path / "ds"
    root.mkdir()
    s = _settings(grid=(16, 16), classes=[f"n{c:04d}" for c in range(100)])  # labels i // 12 < 100
    st = state.State.new(root, s)
    st.start_split("train", {"num_images": len(crops)})
    schema = lance_schema(td.Packing(18, 256), s)
    rows = [{"index": i, "id": td.row_id("train", i, 0), "path": f"train/n0144/n0144_{i * 37 % 9973}.JPEG",
             "label": i // 12, "view": 0, "tokens": pack_tokens(t).tobytes(), "error": ""}
            for i, t in enumerate(idx)]
    for c, (lo, hi) in enumerate(listing.chunk_ranges(len(rows), 300)):
        encode.commit_chunk(root, st, "train", c, rows[lo:hi], hi - lo, schema, 1)
    encode.finalize(root, st, "train")
    bpt = TokenDataset(root).bytes_per_token()
    assert bpt["lance"]["tokens"] == 1200 * 256
    assert bpt["lance"]["bytes_per_token"] <= 2.3, bpt
    assert bpt["mds"]["bytes_per_token"] <= 2.3, bpt
    # 18-bit packing alone is 2.25 bytes/token; check the stored bytes really are the packed tokens
    got = TokenDataset(root).read_lance()["tokens"].reshape(1200, -1)
    assert np.array_equal(got, idx)
    assert split_index(got)[1].max() < 4096


def test_cli_entry_points_give_one_line_errors(tmp_path):
    """`python dataprep/encode.py`, `python -m dataprep.encode`, `python dataprep/inspect_dataset.py` and
    `python -m dataprep.inspect_dataset` start (the file forms put dataprep/ first on sys.path: no module
    there may shadow one the job imports) and fail cleanly."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    assert not {p.stem for p in (repo / "dataprep").glob("*.py")} & set(sys.stdlib_module_names)
    bad = ["--data", str(tmp_path), "--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    for cmd in ([sys.executable, "dataprep/encode.py", *bad], [sys.executable, "-m", "dataprep.encode", *bad],
                [sys.executable, "dataprep/inspect_dataset.py", str(tmp_path / "nothing")],
                [sys.executable, "-m", "dataprep.inspect_dataset", str(tmp_path / "nothing")]):
        p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, (cmd, p.stderr[-2000:])
        assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_decode_and_encoder_stages_without_ray(tmp_path):
    """The two Ray stage functions called directly: ten-crop views, a bad file inside a group."""
    from dataprep import pipeline
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    data = tmp_path / "d"
    image_folder(data, classes=1, per_class=2)
    (data / "train" / "class_00" / "zz_bad.jpg").write_bytes(b"nope")
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "ckpt")
    lst = listing.scan_folder(data, "train")
    views = images.expand_views("tencrop")
    (row,) = pipeline.group_rows("val", 0, listing.groups(lst.items, 3))
    decoded = pipeline.decode_group(row, str(data), 16, views)
    enc = pipeline.TokenizerActor(str(tmp_path / "ckpt"), 16, views, 18)
    batch = {k: np.array([v], dtype=object) for k, v in decoded.items()}
    out = enc(batch).to_pylist()
    assert len(out) == 2 * 10 + 1
    assert out[-1]["view"] == -1 and out[-1]["path"].endswith("zz_bad.jpg") and out[-1]["error"].startswith("not an image")
    tok = Tokenizer.from_checkpoint(tmp_path / "ckpt")
    crops = np.concatenate([images.load_views(data / it.path, 16, views) for it in lst.items[:2]])
    ref = tok.encode(images.to_model_input(crops)).reshape(20, -1).numpy()
    for i, r in enumerate(out[:20]):
        assert r["id"] == td.row_id("val", i // 10, i % 10) and r["view"] == i % 10
        assert np.array_equal(unpack_tokens(r["tokens"], 64, 18), ref[i])


def test_crash_hook_is_a_hidden_internal_argument(capsys):
    base = ["--tokenizer", "t", "--out", "o"]
    assert encode.parse_args(base).crash_at is None
    assert encode.parse_args(base + ["--_crash-at", "2:lance"]).crash_at == encode.CrashPoint(2, "lance")
    assert encode.parse_args(base + ["--_crash-at", "1:complete"]).crash_at == encode.CrashPoint(1, "complete")
    for bad in ("0:lance", "2:disk", "2", "x:mds", "2:complete"):
        with pytest.raises(SystemExit):
            encode.parse_args(base + ["--_crash-at", bad])
        assert "expected K:POINT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        encode.parse_args(["--help"])
    assert "crash" not in capsys.readouterr().out
