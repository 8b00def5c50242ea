"""The token-dataset contract (the shared.token_dataset package): the manifest alone decodes the bytes, dataprep's job
and the tests' synthetic datasets write the same format, and bad manifests are refused in one line."""
import json
from pathlib import Path

import numpy as np
import pytest

from dataprep import encode, state
from shared import token_dataset as td
from shared.image_files import IMAGE_EXTENSIONS, is_image_file
from shared.token_dataset import TokenDataset
from shared.token_dataset.packing import _MAX_BITS
from shared.token_dataset.writer import lance_schema
from support.synthetic_tokens import SYNTHETIC_TOKENIZER, write_tokens

# 11-bit tokens on a 3 x 5 grid: 165 bits, so the last byte of every row is partly padding.
SUBS, GRID, CLASSES, N = (5, 6), (3, 5), 4, 12


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1 << sum(SUBS), (N, 2, GRID[0] * GRID[1]))  # two views per image
    tokens[0, 0] = (1 << sum(SUBS)) - 1  # all bits set: padding must still be zero
    labels = np.arange(N) % CLASSES
    write_tokens(root, {"train": (tokens, labels)}, grid=GRID, num_classes=CLASSES, subtoken_bits=SUBS,
                 views=("center", "flip"), images_per_chunk=5)
    return root, tokens, labels


def _decode_from_manifest_only(data: bytes, packing: dict) -> list:
    """Brute force from the manifest's words: token t is stream bits [t*bits, (t+1)*bits), LSB first."""
    assert packing["codec"] == "lsb-first-bitstream" and "least significant bit first" in packing["order"]
    bits, n = packing["bits"], packing["tokens_per_image"]
    assert len(data) == packing["bytes_per_image"]
    stream = [(data[i // 8] >> (i % 8)) & 1 for i in range(8 * len(data))]
    assert not any(stream[n * bits:]), "padding bits must be zero"
    return [sum(stream[t * bits + j] << j for j in range(bits)) for t in range(n)]


def test_manifest_alone_decodes_lance_and_mds_rows(synthetic, tmp_path):
    import lance
    from streaming import StreamingDataset

    root, tokens, labels = synthetic
    m = json.loads((root / "manifest.json").read_text())  # plain JSON: no project code from here on
    assert m["packing"]["bytes_per_image"] == 21
    lance_cols = m["stores"]["lance"]["columns"]
    table = lance.dataset(str(root / m["stores"]["lance"]["path"])).to_table().sort_by("id")
    assert {f.name: str(f.type) for f in table.schema} == lance_cols
    for rid, label, view, data in zip(*(table[c].to_pylist() for c in ("id", "label", "view", "tokens"))):
        i = int(rid.split("-")[1])
        assert label == labels[i] and m["views"][view] in ("center", "flip")
        assert _decode_from_manifest_only(data, m["packing"]) == tokens[i, view].tolist(), rid
    assert table.num_rows == m["counts"]["train"]["rows"] == 2 * N
    mds = StreamingDataset(remote=str(root / m["stores"]["mds"]["path"].replace("<split>", "train")),
                           local=str(tmp_path / "cache"), shuffle=False, batch_size=1)
    assert mds.num_samples == N  # one sample per image, its views' rows concatenated in views order
    size = m["packing"]["bytes_per_image"]
    for k in range(mds.num_samples):
        s = mds[k]
        i = int(s["id"].split("-")[1])
        assert s["id"] == f"train-{i:08d}" and s["label"] == labels[i] and len(s["tokens"]) == 2 * size
        for v in range(2):
            assert _decode_from_manifest_only(s["tokens"][v * size:(v + 1) * size], m["packing"]) == \
                tokens[i, v].tolist()


def test_stage2_reads_the_synthetic_dataset_through_the_packing(synthetic, tmp_path):
    """An epoch is one pass over the images, each with one of its views; two epochs of a two-view dataset
    take every (image, view) once. Evaluation (no view seed) reads view 0."""
    from shared.tokens import join_index
    from shared.token_dataset import read_manifest
    from stage2_ar.data import TokenLayout, build_loader

    root, tokens, labels = synthetic
    lay = TokenLayout.from_manifest(read_manifest(str(root)))
    assert (lay.tokens_per_image, lay.bits_per_token, lay.subtoken_bits, lay.views) == (15, 11, SUBS, 2)

    def epochs(n, **kw):
        loader = build_loader(str(root), split="train", batch_size=1, layout=lay, shuffle=False,
                              cache_dir=str(tmp_path / f"c{len(kw)}"), **kw)
        out = []
        for _ in range(n):
            seen = []
            for subs, labs in loader:
                row = join_index(subs, SUBS).numpy()[0]
                hits = [(i, v) for i in range(N) for v in range(2) if np.array_equal(tokens[i, v], row)]
                assert len(hits) == 1 and labels[hits[0][0]] == int(labs[0])
                seen += hits
            out.append(seen)
        return out

    first, second = epochs(2, view_seed=5)
    for seen in (first, second):
        assert sorted(i for i, _ in seen) == list(range(N))
    assert sorted(first + second) == [(i, v) for i in range(N) for v in range(2)]
    assert {v for _, v in first} == {0, 1}  # the views of one epoch are mixed, not all the same one
    (plain,) = epochs(1)
    assert plain == [(i, 0) for i in range(N)]



def test_the_streaming_reader_gives_one_view_or_all(synthetic, tmp_path):
    """``TokenDataset.streaming`` (the TokenStream Stage 2 and the experiments read through): a chosen view's
    (h, w) indices, or all views' (V, h, w)."""
    root, tokens, labels = synthetic
    ds = TokenDataset(root)
    every = ds.streaming("train", tmp_path / "every", shuffle=False, batch_size=1)
    flip = ds.streaming("train", tmp_path / "flip", view=1, shuffle=False, batch_size=1)
    assert every.num_samples == flip.num_samples == N
    for k in range(N):
        a, b = every[k], flip[k]
        i = int(a["id"].split("-")[1])
        assert a["id"] == b["id"] and a["label"] == b["label"] == labels[i]
        assert a["tokens"].shape == (2, *GRID) and b["tokens"].shape == GRID
        assert np.array_equal(a["tokens"].reshape(2, -1), tokens[i])
        assert np.array_equal(b["tokens"].reshape(-1), tokens[i, 1])

def _dataprep_dataset(root: Path):
    """A dataset written by the job's own commit and finalize steps (no Ray, no tokenizer needed)."""
    settings = {"format": td.FORMAT, "version": td.VERSION, "grid": list(GRID), "bits_per_token": sum(SUBS),
                "bit_order": td.BIT_ORDER, "subtoken_bits": list(SUBS), "classes": [f"c{i}" for i in range(CLASSES)],
                "resolution": 8, "views": ["center"], "precision": "fp32", "tokenizer": SYNTHETIC_TOKENIZER}
    root.mkdir()
    st = state.State.new(root, settings)
    st.start_split("train", {"num_images": 3})
    rng = np.random.default_rng(1)
    packing = td.Packing(sum(SUBS), GRID[0] * GRID[1])
    rows = [{"index": i, "id": td.row_id("train", i, 0), "path": f"train/{i}.jpg", "label": i % CLASSES, "view": 0,
             "tokens": packing.encode(rng.integers(0, 1 << 11, 15)), "error": ""} for i in range(2)]
    rows.append({"index": 2, "id": td.row_id("train", 2, -1), "path": "train/2.jpg", "label": 0, "view": -1,
                 "tokens": b"", "error": "corrupt: test"})
    encode.commit_chunk(root, st, "train", 0, rows, 3, lance_schema(packing, settings), 1)
    return encode.finalize(root, st, "train"), settings


def _key_paths(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("per_class", "config", "counts", "lance_files", "splits"):
            out |= _key_paths(v, f"{prefix}{k}.")
        elif k in ("counts", "splits"):  # keyed by split name
            for c in v.values():
                out |= _key_paths(c, f"{prefix}{k}.<split>.")
        elif k == "chunks":
            for c in v:
                out |= _key_paths(c, f"{prefix}{k}[].")
    return out


def test_synthetic_and_dataprep_datasets_share_one_format(synthetic, tmp_path):
    root, _, _ = synthetic
    job, settings = _dataprep_dataset(tmp_path / "job")
    syn = json.loads((root / "manifest.json").read_text())
    assert _key_paths(job) == _key_paths(syn)
    assert set(job) == set(td.Manifest.from_dict(syn).to_dict())
    assert td.Manifest.from_dict(job) == td.read_manifest(tmp_path / "job")
    assert job["counts"]["train"] == {"images": 3, "encoded_images": 2, "failed_images": 1, "rows": 2,
                                      "per_class": {"0": 1, "1": 1}, "complete": True}
    assert job["packing"] == syn["packing"] and job["stores"]["lance"] == syn["stores"]["lance"]
    a, b = TokenDataset(tmp_path / "job"), TokenDataset(root)
    assert [(f.name, f.type, f.metadata) for f in a.lance().schema] == [(f.name, f.type, f.metadata)
                                                                        for f in b.lance().schema]
    assert a.provenance() == settings
    idx = [json.loads(p.read_text()) for p in (tmp_path / "job" / "mds" / "train" / "index.json",
                                               root / "mds" / "train" / "index.json")]
    for key in ("column_names", "column_encodings", "compression"):
        assert idx[0]["shards"][0][key] == idx[1]["shards"][0][key], key
    assert dict(zip(idx[0]["shards"][0]["column_names"], idx[0]["shards"][0]["column_encodings"])) == td.MDS_COLUMNS


def test_bad_manifests_are_refused_in_one_line(synthetic, tmp_path):
    root, _, _ = synthetic
    good = json.loads((root / "manifest.json").read_text())
    train = good["counts"]["train"]
    cases = [
        ({"version": 1}, "version 1 .*encode it again"),
        ({"version": 2}, "version 2 .*encode it again"),  # one MDS sample per (image, view)
        ({"version": 4}, "expected format 'open-magvit2-tokens' version 3, got .* version 4 .*newer"),
        ({"extra": 1}, "unknown extra"),
        ({"packing": {**good["packing"], "bytes_per_image": 20}}, "bytes_per_image is 20"),
        ({"packing": {**good["packing"], "codec": "varint"}}, "packing codec"),
        ({"packing": {**good["packing"], "bits": 12, "bytes_per_image": 23}}, "does not match bits_per_token"),
        ({"subtoken_bits": [6, 6]}, "do not add up to bits_per_token"),
        ({"bit_order": "big-endian"}, "bit order"),
        ({"num_classes": 5}, "num_classes is 5"),
        ({"failures": 2}, "failures is 2"),
        ({"counts": {"train": {**train, "encoded_images": 13}}}, "do not add up to 12 images"),
        ({"counts": {"train": {**train, "rows": 12}}}, "rows is 12"),
        ({"counts": {"train": {**train, "per_class": {"0": 11}}}}, "per_class sums to 11"),
        ({"counts": {"train": {**train, "per_class": {"9": 12}}}}, "label '9'"),
        ({"counts": {"../x": train}}, "split name"),
        ({"tokenizer": {**good["tokenizer"], "checkpoint_sha256": "abc"}}, "64 hex digits"),
        ({"stores": {}}, "stores is"),
        ({"grid": [3, 0]}, "grid must be"),
        ({"packing": {**good["packing"], "bits": 40}}, "bits must be an integer"),
    ]
    for change, what in cases:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(td.ManifestError, match=what) as e:
            td.read_manifest(tmp_path)
        assert "\n" not in str(e.value) and str(tmp_path / "manifest.json") in str(e.value), change
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(td.ManifestError, match="not valid JSON"):
        td.read_manifest(tmp_path)


def test_writer_refuses_bad_input_and_existing_datasets(synthetic, tmp_path):
    root, tokens, labels = synthetic
    with pytest.raises(ValueError, match="already holds"):
        write_tokens(root, {"train": (tokens, labels)}, grid=GRID, num_classes=CLASSES, subtoken_bits=SUBS)
    with pytest.raises(ValueError, match=r"\(N, 1, T\)"):
        write_tokens(tmp_path / "a", {"train": (tokens, labels)}, grid=GRID, num_classes=CLASSES, subtoken_bits=SUBS)
    with pytest.raises(td.ManifestError, match="per_class label '7'"):
        write_tokens(tmp_path / "b", {"train": (tokens[:, 0], labels + 7)}, grid=GRID, num_classes=CLASSES,
                     subtoken_bits=SUBS)
    with pytest.raises(ValueError, match="15 tokens, got 16"):
        td.Packing(11, 15).encode(np.zeros(16, np.int64))
    assert not (tmp_path / "b").exists()  # validated before anything is written


def test_packing_agrees_with_the_codec():
    from shared import tokens

    assert _MAX_BITS == tokens.MAX_BITS
    rng = np.random.default_rng(2)
    for bits in (1, 7, 11, 18, 31):
        for n in (1, 3, 15, 256):
            p = td.Packing(bits, n)
            t = rng.integers(0, 1 << bits, n)
            data = p.encode(t)
            assert len(data) == p.bytes_per_image == tokens.packed_nbytes(n, bits)
            assert data == tokens.pack_tokens(t, bits).tobytes()
            assert np.array_equal(p.decode(data), t)
    with pytest.raises(td.ManifestError, match="bits must be"):
        td.Packing(32, 4)


def test_one_image_extension_list_for_both_scanners(tmp_path):
    """The tokenizer's folder loader and dataprep's listing take exactly the same files."""
    from dataprep.listing import scan_folder
    from stage1_tokenizer.data import find_images

    cls = tmp_path / "train" / "cat"
    cls.mkdir(parents=True)
    names = [f"a{ext}" for ext in IMAGE_EXTENSIONS] + [f"b{ext.upper()}" for ext in IMAGE_EXTENSIONS]
    others = ["readme.txt", ".hidden.jpg", "labels.csv", "noext", "x.jpg.part"]
    for name in names + others:
        (cls / name).write_bytes(b"x")
    assert all(is_image_file(n) for n in names) and not any(is_image_file(n) for n in others)
    got_stage1 = sorted(p.name for p, _ in find_images(tmp_path / "train")[0])
    listing = scan_folder(tmp_path, "train")
    assert got_stage1 == sorted(Path(it.path).name for it in listing.items) == sorted(names)
    assert listing.ignored == len(others)
