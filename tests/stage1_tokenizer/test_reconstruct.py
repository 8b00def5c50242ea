"""python -m stage1_tokenizer.reconstruct: reconstructions, side-by-side PNGs, token indices and PSNR / SSIM
per image, at any size the network takes; one-line errors; it never replaces what it did not make."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.images import to_uint8
from stage1_tokenizer import reconstruct
from stage1_tokenizer.data import to_tensor
from stage1_tokenizer.metrics import psnr_per_image, ssim_per_image
from stage1_tokenizer.tokenizer import Tokenizer

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "official" / "golden"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The golden tiny tokenizer (official code, factor 4), converted once."""
    from stage1_tokenizer import convert_official

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    convert_official.main([str(GOLDEN / "tokenizer_tiny.ckpt"), str(out)])
    return out


def _run(tok_dir, *args):
    return reconstruct.main(["--tokenizer", str(tok_dir), "--device", "cpu", *map(str, args)])


def _error(tok_dir, *args) -> str:
    with pytest.raises(SystemExit) as e:
        _run(tok_dir, *args)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_a_folder_of_photos(tok_dir, photos, tmp_path, capsys):
    out = tmp_path / "out"
    record = _run(tok_dir, photos, "--out", out)
    tok = Tokenizer.from_checkpoint(tok_dir)
    files = sorted(photos.glob("*.png"))
    assert [r["name"] for r in record["images"]] == [p.stem for p in files] and len(files) > 10
    assert record["tool"] == reconstruct.TOOL and record["tokenizer"]["source"] == "directory"
    for path, row in zip(files, record["images"]):
        x = to_tensor(Image.open(path))[None]
        idx = tok.encode(x)
        rec = to_uint8(tok.decode(idx).clamp(-1, 1))
        a = to_uint8(x)
        assert np.array_equal(np.load(out / row["tokens"]), idx[0].numpy())
        assert np.array_equal(_png(out / row["reconstructions"]), rec[0].permute(1, 2, 0).numpy())
        side = _png(out / row["side_by_side"])
        assert side.shape == (24, 48, 3) and np.array_equal(side[:, :24], a[0].permute(1, 2, 0).numpy())
        assert row["psnr"] == pytest.approx(float(psnr_per_image(a, rec)[0]), abs=1e-6)
        assert row["ssim"] == pytest.approx(float(ssim_per_image(a, rec)[0]), abs=1e-6)
        assert row["token_grid"] == [6, 6] and (row["width"], row["height"]) == (24, 24)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in record["images"]]))
    assert "mean" in capsys.readouterr().out
    # run again into its own output: allowed, same result
    assert _run(tok_dir, photos, "--out", out)["mean"] == record["mean"]


def test_any_size_the_network_takes(tok_dir, photos, tmp_path):
    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    first = sorted(photos.glob("*.png"))[0]
    Image.open(first).resize((32, 48)).save(src / "tall.png")  # 32x48: both multiples of 4, taken as it is
    Image.open(first).save(src / "nested" / "tall.jpg")  # the same stem in another folder: no collision
    Image.open(first).resize((26, 30)).save(src / "odd.png")
    msg = _error(tok_dir, src, "--out", tmp_path / "o")
    assert "odd.png is 26x30: the tokenizer takes sides that are multiples of 4 (e.g. 24x28)" in msg
    assert "--size N" in msg
    assert not (tmp_path / "o").exists()  # checked before any work
    (src / "odd.png").unlink()
    rec = _run(tok_dir, src, "--out", tmp_path / "o")
    assert {r["name"]: r["token_grid"] for r in rec["images"]} == {"tall": [12, 8], "nested/tall": [6, 6]}
    for size in (32, 48):  # larger than the training size: resize the shorter side, centre crop
        rec = _run(tok_dir, src, "--out", tmp_path / f"s{size}", "--size", size)
        assert all(r["token_grid"] == [size // 4] * 2 for r in rec["images"])
        assert _png(tmp_path / f"s{size}" / "reconstructions" / "tall.png").shape == (size, size, 3)
    assert "not a multiple of the tokenizer's downsampling factor 4" in _error(tok_dir, src, "--out", tmp_path / "x",
                                                                              "--size", 30)
    # two files with one stem in one folder keep their suffixes
    Image.open(first).save(src / "tall.bmp")
    names = {r["name"] for r in _run(tok_dir, src, "--out", tmp_path / "both")["images"]}
    assert names == {"tall.png", "tall.bmp", "nested/tall"}


def test_bad_inputs_are_one_line_errors(tok_dir, tmp_path):
    assert "no such file or directory" in _error(tok_dir, tmp_path / "missing", "--out", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert "no images (.jpg" in _error(tok_dir, tmp_path / "empty", "--out", tmp_path / "o")
    assert "not an image file" in _error(tok_dir, tmp_path / "empty" / "notes.txt", "--out", tmp_path / "o")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    assert "cannot read" in _error(tok_dir, tmp_path / "bad", "--out", tmp_path / "o")
    assert "cannot load tokenizer" in _error(tmp_path / "no-tokenizer", tmp_path / "bad", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_never_replaces_what_it_did_not_make(tok_dir, photos, tmp_path):
    one = tmp_path / "one.png"
    shutil.copy(sorted(photos.glob("*.png"))[0], one)
    user = tmp_path / "user"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "todo.txt").write_text("mine\n")
    (user / "metrics.json").write_text("my own metrics\n")
    assert "already exists and is not an output directory of" in _error(tok_dir, one, "--out", user)
    assert (user / "metrics.json").read_text() == "my own metrics\n" and sorted(p.name for p in user.iterdir()) == [
        "metrics.json", "notes"]
    shutil.rmtree(user / "notes")  # a metrics.json that this tool did not write is not taken for its own
    assert "already exists and is not an output directory of" in _error(tok_dir, one, "--out", user)
    assert (user / "metrics.json").read_text() == "my own metrics\n"
    (user / "metrics.json").unlink()
    (user / "notes").mkdir()
    (user / "notes" / "todo.txt").write_text("mine\n")
    _run(tok_dir, one, "--out", user, "--overwrite")  # writes its files, leaves the others alone
    assert (user / "notes" / "todo.txt").read_text() == "mine\n" and (user / "reconstructions" / "one.png").is_file()
    (tmp_path / "afile").write_text("x")
    assert "not a directory" in _error(tok_dir, one, "--out", tmp_path / "afile")


def test_the_output_folder_inside_the_input_is_not_read_back(tok_dir, photos, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sorted(photos.glob("*.png"))[0], src / "a.png")
    _run(tok_dir, src, "--out", src / "recon")
    rec = _run(tok_dir, src, "--out", src / "recon")
    assert [r["name"] for r in rec["images"]] == ["a"]
