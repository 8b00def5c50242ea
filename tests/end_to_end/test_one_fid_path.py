"""Stage-1 rFID and Stage-2 FID are one computation: same images in, same number out, through both CLIs.

The originals and reconstructions a tokenizer evaluation scores are written as an ADM reference batch and a
samples.npz, and ``stage2_ar.evaluate --samples`` scores them: its FID must equal ``stage1_tokenizer.evaluate``'s
rFID. Fast version: a tiny stand-in feature network patched into ``shared.inception.load_inception`` (the
seam both CLIs load their network through). Slow version: the real InceptionV3 code with *randomly
initialised* weights written in the real file format (tests/support/random_inception.py; nothing is downloaded).
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shared import inception
from shared.images import to_uint8_nhwc
from stage1_tokenizer import evaluate as ev1
from stage2_ar import evaluate as ev2
from stage2_ar.samples_npz import write_samples
from support.tiny_features import tiny_features

pytestmark = pytest.mark.usefixtures("one_thread")
RES, BATCH = 16, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("onefid")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    torch.manual_seed(0)
    tok = Tokenizer(PRESETS["tokenizer-tiny"])
    tok.save(root / "ckpt")
    return root, tok


def _stage2_batches(root, tok, limit=None):
    """The evaluation's originals and reconstructions as (N, H, W, 3) uint8, computed the way Stage 1 does."""
    from stage1_tokenizer.data import ImageFolderDataset, make_eval_loader

    loader = make_eval_loader(ImageFolderDataset(root / "data", RES, train=False), BATCH, limit=limit)
    real, fake = [], []
    with torch.no_grad():
        for batch in loader:
            x = batch["image"]
            rec = tok.decode(tok.encode(x)).float().clamp(-1, 1)
            real.append(to_uint8_nhwc(x))
            fake.append(to_uint8_nhwc(rec))
    real_path, fake_path = root / "real.npz", root / "fake.npz"
    write_samples(real_path, np.concatenate(real))
    write_samples(fake_path, np.concatenate(fake))
    return real_path, fake_path


def _both(root, tok, tmp_path, weights, limit=None):
    common = ["--inception", str(weights)]
    lim = [] if limit is None else ["--limit", str(limit)]
    rec = ev1.main(["--ckpt", str(root / "ckpt"), "--data", str(root / "data"), "--resolution", str(RES),
                    "--workers", "0", "--batch-size", str(BATCH), "--require", "rfid"] + lim + common)
    real, fake = _stage2_batches(root, tok, limit)
    assert ev2.main(["--samples", str(fake), "--ref", str(real), "--out", str(tmp_path / "gen"), "--device", "cpu",
                     "--feature-batch", str(BATCH)] + common) == 0
    gen = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert gen["num_samples"] == gen["num_reference"] == rec["images"]
    return rec["rfid"], gen["fid"]


def test_stage1_rfid_equals_stage2_fid_of_the_same_images(setup, tmp_path, monkeypatch):
    root, tok = setup
    seen = []

    def stand_in(weights=None, device="cpu"):
        seen.append(str(weights))
        return tiny_features(dim=4)

    monkeypatch.setattr(inception, "load_inception", stand_in)
    rfid, fid = _both(root, tok, tmp_path, "weights.pth")
    assert seen == ["weights.pth", "weights.pth"]  # one flag, one loader, in both stages
    assert rfid > 0.01  # reconstructions of an untrained tokenizer are far from the originals
    assert fid == pytest.approx(rfid, rel=1e-9)


@pytest.mark.slow  # InceptionV3 at 299 px on CPU, 2048-d covariances
def test_with_the_real_network_and_weights_file(setup, tmp_path):
    from support.random_inception import write_random_inception

    root, tok = setup
    weights = write_random_inception(tmp_path / inception.INCEPTION_FILE)
    rfid, fid = _both(root, tok, tmp_path, weights, limit=4)
    assert np.isfinite(rfid) and rfid > 1e-6  # the He-initialised features do tell the images apart
    assert fid == pytest.approx(rfid, rel=1e-6)
