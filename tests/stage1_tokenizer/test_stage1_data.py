"""Stage-1 image data: layouts, the official crops, bad files skipped, sharded and resumable sampling."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_tokenizer import data


def _write(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_imagenet_and_plain_layouts(tmp_path):
    _write(tmp_path / "in" / "n02" / "b.png", 20, 20)
    _write(tmp_path / "in" / "n01" / "a.jpg", 20, 20)
    _write(tmp_path / "in" / "n01" / "sub" / "c.png", 20, 20)
    (tmp_path / "in" / "n01" / "notes.txt").write_text("x")
    items, classes = data.find_images(tmp_path / "in")
    assert classes == ["n01", "n02"]
    assert [(p.name, y) for p, y in items] == [("a.jpg", 0), ("c.png", 0), ("b.png", 1)]
    _write(tmp_path / "plain" / "x.png", 20, 20)
    items, _ = data.find_images(tmp_path / "plain")
    assert [(p.name, y) for p, y in items] == [("x.png", 0)]
    with pytest.raises(FileNotFoundError):
        data.find_images(tmp_path / "empty-does-not-exist")


@pytest.mark.parametrize("w,h", [(40, 20), (23, 37)])
def test_resize_shorter_side_then_crops(tmp_path, w, h):
    arr = _write(tmp_path / "img" / "a.png", w, h)
    ds = data.ImageFolderDataset(tmp_path / "img", 10, train=False)
    x = ds[0]["image"]
    assert x.shape == (3, 10, 10) and x.min() >= -1 and x.max() <= 1
    # torchvision's Resize(10) does exactly this on a PIL image
    from torchvision.transforms import CenterCrop, Resize

    ref = CenterCrop(10)(Resize(10)(Image.fromarray(arr)))
    resized = np.asarray(ref, dtype=np.float32)
    assert torch.allclose(x, torch.from_numpy(resized).permute(2, 0, 1) / 127.5 - 1)
    # training crops: a pure function of (epoch, index); they vary across epochs
    tr = data.ImageFolderDataset(tmp_path / "img", 10, train=True, seed=3)
    a, b = tr[(0, 0)]["image"], tr[(0, 0)]["image"]
    assert a.equal(b)
    crops = {tuple(tr[(e, 0)]["image"][0, 0, :3].tolist()) for e in range(12)}
    assert len(crops) > 1


def test_unreadable_images_are_skipped_with_a_reason(tmp_path, caplog):
    _write(tmp_path / "img" / "a.png", 16, 16, seed=1)
    (tmp_path / "img" / "b.png").write_bytes(b"not a png at all")
    _write(tmp_path / "img" / "c.png", 16, 16, seed=2)
    ds = data.ImageFolderDataset(tmp_path / "img", 16, train=False)
    data.log.propagate = True
    caplog.set_level(logging.WARNING)
    try:
        out = ds[1]  # b.png is broken: c.png stands in
    finally:
        data.log.propagate = False
    assert out["index"].item() == 2 and out["image"].equal(ds[2]["image"])
    assert "b.png" in caplog.text and "UnidentifiedImageError" in caplog.text
    # a full pass through a loader never crashes
    batches = list(data.make_eval_loader(ds, batch_size=2))
    assert sum(b["image"].shape[0] for b in batches) == 3


def test_epoch_sampler_shards_and_reshuffles():
    n, world = 11, 3
    shards = [data.EpochSampler(n, seed=1, rank=r, world_size=world) for r in range(world)]
    per = [s.keys(0) for s in shards]
    assert all(len(p) == n // world for p in per)
    flat = sum(per, [])
    assert len(set(flat)) == len(flat)  # disjoint
    assert shards[0].keys(0) != shards[0].keys(1)  # a new permutation each epoch
    it = iter(shards[1])
    keys = [next(it) for _ in range(7)]  # crosses into epoch 2
    assert keys[:3] == [(0, k) for k in per[1]] and keys[3][0] == 1 and keys[6][0] == 2
    # the iterator state resumes exactly
    it = iter(shards[1])
    for _ in range(4):
        next(it)
    state = it.state_dict()
    rest = [next(it) for _ in range(5)]
    it2 = iter(shards[1])
    it2.load_state_dict(state)
    assert [next(it2) for _ in range(5)] == rest


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_loader_resumes_mid_epoch(tmp_path, workers):
    for i in range(10):
        _write(tmp_path / "img" / f"{i}.png", 12, 12, seed=i)
    ds = data.ImageFolderDataset(tmp_path / "img", 8, train=True, seed=0)
    ref_loader = data.make_train_loader(ds, batch_size=3, num_workers=workers, seed=5)
    it = iter(ref_loader)
    ref = [next(it) for _ in range(6)]  # 6 x 3 = 18 samples: crosses an epoch boundary
    loader = data.make_train_loader(ds, batch_size=3, num_workers=workers, seed=5)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    del it, loader
    resumed = data.make_train_loader(ds, batch_size=3, num_workers=workers, seed=5)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = [next(it) for _ in range(4)]
    for a, b in zip(ref[2:], got):
        assert a["index"].equal(b["index"]) and a["image"].equal(b["image"])
