"""The samples.npz layout: exact keys, round trips, labels only in arr_1, one-line errors, atomic writes."""
import numpy as np
import pytest

from stage2_ar import samples_npz as sn


def _images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)


def test_round_trip_with_and_without_labels(tmp_path):
    imgs = _images()
    sn.write_samples(tmp_path / "a.npz", imgs, np.array([3, 1, 4, 1], dtype=np.int32))
    with np.load(tmp_path / "a.npz") as z:  # what the ADM evaluator sees
        assert z.files == ["arr_0", "arr_1"] and z["arr_1"].dtype == np.int64
    got, labels = sn.read_samples(tmp_path / "a.npz")
    assert np.array_equal(got, imgs) and labels.tolist() == [3, 1, 4, 1]
    sn.write_samples(tmp_path / "b.npz", imgs)
    with np.load(tmp_path / "b.npz") as z:
        assert z.files == ["arr_0"]
    got, labels = sn.read_samples(tmp_path / "b.npz")
    assert np.array_equal(got, imgs) and labels is None


def test_labels_come_from_arr_1_only_and_reference_extras_are_ignored(tmp_path):
    imgs = _images()
    np.savez(tmp_path / "other.npz", arr_0=imgs, labels=np.arange(4))  # any other key is not the label array
    got, labels = sn.read_samples(tmp_path / "other.npz")
    assert np.array_equal(got, imgs) and labels is None
    # a reference batch's second array is not a label list: ignored when labels are not wanted
    np.savez(tmp_path / "ref.npz", arr_0=imgs, arr_1=np.zeros((2, 2)))
    assert sn.read_samples(tmp_path / "ref.npz", labels=False)[1] is None
    with pytest.raises(sn.SamplesFileError, match="labels must be 4 integers"):
        sn.read_samples(tmp_path / "ref.npz")


def test_bad_files_and_arrays_are_one_line_errors(tmp_path):
    imgs = _images()
    (tmp_path / "text.npz").write_text("not an npz")
    np.save(tmp_path / "one.npy", imgs)
    np.savez(tmp_path / "nokey.npz", images=imgs)
    np.savez(tmp_path / "float.npz", arr_0=imgs.astype(np.float32))
    cases = {"missing.npz": "not a readable .npz", "text.npz": "not a readable .npz", "one.npy": "single .npy",
             "nokey.npz": "has no arr_0 image array (keys: images)", "float.npz": "must be (N, H, W, 3) uint8"}
    for name, msg in cases.items():
        with pytest.raises(sn.SamplesFileError) as e:
            sn.read_samples(tmp_path / name)
        assert msg in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(sn.SamplesFileError, match="must be"):
        sn.write_samples(tmp_path / "w.npz", imgs[..., :1])
    with pytest.raises(sn.SamplesFileError, match="labels must be 4 integers"):
        sn.write_samples(tmp_path / "w.npz", imgs, np.array([0.5, 1, 2, 3]))
    assert not (tmp_path / "w.npz").exists()


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    imgs = _images()
    sn.write_samples(tmp_path / "s.npz", imgs, np.arange(4))

    def dies(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies)
    with pytest.raises(KeyboardInterrupt):
        sn.write_samples(tmp_path / "s.npz", _images(seed=1), np.arange(4))
    monkeypatch.undo()
    got, labels = sn.read_samples(tmp_path / "s.npz")
    assert np.array_equal(got, imgs) and labels.tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left behind
