"""The Stage-2 evaluate CLI's plumbing, reference batches and the samples.npz round trip with the sampler.

No InceptionV3 weights exist on test machines, so a tiny fixed random network stands in for the feature
function (patched into ``shared.inception.load_inception``, the seam both stages use); the real loading path
is tested in tests/shared/test_inception.py, the metric math in tests/shared/test_feature_metrics.py.
The stand-in is tests/support/tiny_features.py.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from shared import inception
from stage2_ar import evaluate as ev
from stage2_ar import gen_metrics as gm
from stage2_ar import samples_npz
from support.tiny_features import stand_in, tiny_features


pytestmark = pytest.mark.usefixtures("one_thread")


def test_compute_metrics_plumbing():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    fn = tiny_features()
    same = gm.compute_metrics(imgs, imgs.copy(), fn, batch_size=10)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["is"] >= 1.0 and same["num_samples"] == 64
    dark = (imgs // 4).astype(np.uint8)
    other = gm.compute_metrics(dark, imgs, fn, batch_size=10)
    assert other["fid"] > 1.0 and other["precision"] < 0.5


def test_npz_and_folder_references(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    samples_npz.write_samples(tmp_path / "s.npz", imgs, np.arange(5))
    with np.load(tmp_path / "s.npz") as z:
        assert z.files == ["arr_0", "arr_1"] and np.array_equal(z["arr_0"], imgs)
    assert np.array_equal(gm.load_reference(str(tmp_path / "s.npz")), imgs)
    folder = tmp_path / "ref"
    folder.mkdir()
    Image.fromarray(imgs[0]).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "b.png")
    ref = gm.load_reference(str(folder), size=8)
    assert ref.shape == (2, 8, 8, 3) and np.array_equal(ref[0], imgs[0])
    with pytest.raises(gm.MetricsError, match="neither"):
        gm.load_reference(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(gm.MetricsError, match="no arr_0"):
        gm.load_reference(str(tmp_path / "bad.npz"))


def test_missing_or_wrong_inception_weights_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="error: InceptionV3 FID weights not found at .*nope.pth"):
        ev.main(["--samples", "x.npz", "--ref", "r.npz", "--inception", str(tmp_path / "nope.pth"),
                 "--out", str(tmp_path / "o")])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))  # no flag: the documented default place
    with pytest.raises(SystemExit, match=f"error: .*not found at .*{inception.INCEPTION_FILE}.*--inception PATH"):
        ev.main(["--samples", "x.npz", "--ref", "r.npz", "--out", str(tmp_path / "o")])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(SystemExit, match="error: .*wrong.pth is not the FID InceptionV3 state dict"):
        ev.main(["--samples", "x.npz", "--ref", "r.npz", "--inception", str(tmp_path / "wrong.pth"),
                 "--out", str(tmp_path / "o")])


def test_evaluate_cli_generates_fixed_seed_samples(tmp_path, monkeypatch, tiny_checkpoints):
    torch.manual_seed(0)
    ar, tok = tiny_checkpoints  # non-zero heads so samples depend on the seed and the class
    ref = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    samples_npz.write_samples(tmp_path / "ref.npz", ref)
    monkeypatch.setattr(inception, "load_inception", stand_in)

    def run(out, seed=42):
        ev.main(["--ckpt", str(ar), "--tokenizer", str(tok), "--per-class", "3",
                 "--classes", "0,1,2,3", "--batch-size", "5", "--seed", str(seed), "--ref", str(tmp_path / "ref.npz"),
                 "--inception", "unused", "--out", str(out), "--device", "cpu"])
        with np.load(out / "samples.npz") as z:
            return z["arr_0"], z["arr_1"]

    a, labels = run(tmp_path / "e1")
    assert a.shape == (12, 8, 8, 3) and a.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    b, _ = run(tmp_path / "e2")
    assert np.array_equal(a, b)  # fixed seeds
    c, _ = run(tmp_path / "e3", seed=7)
    assert not np.array_equal(a, c)
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert {"fid", "is", "precision", "recall"} <= set(m) and math.isfinite(m["fid"])
    assert m["settings"]["per_class"] == 3 and m["num_samples"] == 12
    # scoring an existing batch gives the same numbers
    ev.main(["--samples", str(tmp_path / "e1" / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
             "--inception", "unused", "--out", str(tmp_path / "e4"), "--device", "cpu"])
    m4 = json.loads((tmp_path / "e4" / "metrics.json").read_text())
    assert m4["fid"] == pytest.approx(m["fid"]) and m4["precision"] == m["precision"]


def test_sample_npz_round_trips_through_evaluate_samples(tmp_path, monkeypatch, tiny_checkpoints):
    """``stage2_ar.sample --npz`` writes what ``stage2_ar.evaluate --samples`` reads: images and labels."""
    from stage2_ar.sample import main as sample_main

    ar, tok = tiny_checkpoints
    assert sample_main(["--ckpt", str(ar), "--tokenizer", str(tok), "--classes", "0,3,9",
                        "--per-class", "2", "--npz", "--no-grid", "--seed", "1", "--out", str(tmp_path / "s")]) == 0
    path = tmp_path / "s" / "samples.npz"
    with np.load(path) as z:
        assert z.files == [samples_npz.IMAGES_KEY, samples_npz.LABELS_KEY] == ["arr_0", "arr_1"]
        raw_images, raw_labels = z["arr_0"], z["arr_1"]
    images, labels = samples_npz.read_samples(path)
    assert np.array_equal(images, raw_images) and images.dtype == np.uint8 and images.shape[0] == 6
    assert labels.tolist() == [0, 0, 3, 3, 9, 9] and labels.dtype == np.int64
    assert len({images[i].tobytes() for i in range(6)}) > 1

    ref = np.random.default_rng(1).integers(0, 256, (20,) + images.shape[1:], dtype=np.uint8)
    samples_npz.write_samples(tmp_path / "ref.npz", ref)
    monkeypatch.setattr(inception, "load_inception", stand_in)
    assert ev.main(["--samples", str(path), "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "e"),
                    "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["num_samples"] == 6 and m["settings"]["num_classes"] == 3
    direct = gm.compute_metrics(raw_images, ref, tiny_features())
    assert m["fid"] == pytest.approx(direct["fid"], rel=1e-12) and m["recall"] == direct["recall"]

    # labels that do not belong to the images are refused with one line
    with np.load(path) as z:
        np.savez(tmp_path / "bad.npz", arr_0=z["arr_0"], arr_1=z["arr_1"][:4])
    with pytest.raises(SystemExit, match=r"error: --samples: .*bad.npz: labels must be 6 integers"):
        ev.main(["--samples", str(tmp_path / "bad.npz"), "--ref", str(tmp_path / "ref.npz"),
                 "--out", str(tmp_path / "e2"), "--device", "cpu"])
