import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from dataprep import fashion_mnist as fm


def write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_to_imagenet_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    data = {}
    for split, n in (("train", 40), ("val", 20)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(root / fm.FILES[split][0], imgs)
        write_idx(root / fm.FILES[split][1], labels)
        data[split] = (imgs, labels)
    assert np.array_equal(fm.read_idx(root / fm.FILES["train"][0]), data["train"][0])
    out = tmp_path / "out"
    assert fm.main(["--root", str(root), "--out", str(out), "--per-class", "3", "--val-per-class", "1", "--size", "28"]) == 0
    classes = sorted(p.name for p in (out / "train").iterdir())
    assert classes == [fm.class_dir(i) for i in range(10)]  # sorted order == label order
    for split, per in (("train", 3), ("val", 1)):
        imgs, labels = data[split]
        for label, name in enumerate(classes):
            files = sorted((out / split / name).iterdir())
            assert len(files) == per
            for f in files:
                i = int(f.stem)
                assert labels[i] == label
                px = np.asarray(Image.open(f))
                assert px.shape == (28, 28, 3) and np.array_equal(px[..., 0], imgs[i])


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        fm.main(["--root", str(tmp_path), "--out", str(tmp_path / "o")])
