import numpy as np
import torch
from PIL import Image

from shared import runlog


def test_metrics_and_grid(tmp_path):
    log = runlog.RunLogger(tmp_path, rank=0)
    log.scalars(1, {"loss": torch.tensor(2.5), "lr": 1e-4})
    log.scalars(2, {"loss": 1.5})
    imgs = torch.linspace(-1, 1, 5 * 3 * 4 * 6).reshape(5, 3, 4, 6)
    path = log.images(2, "recon", imgs, nrow=3)
    log.close()
    rows = runlog.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 1.5)] and rows[0]["lr"] == 1e-4
    assert any((tmp_path / "tb").iterdir())
    grid = np.asarray(Image.open(path))
    pad = 2
    assert grid.shape == (2 * (4 + pad) + pad, 3 * (6 + pad) + pad, 3)
    # image 4 sits in row 1, column 1; uint8 conversion is (x + 1) * 127.5 rounded
    expect = ((imgs[4].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert (grid[pad + 6: pad + 6 + 4, pad + 8: pad + 8 + 6] == expect).all()


def test_nonzero_rank_writes_nothing(tmp_path):
    log = runlog.RunLogger(tmp_path / "r1", rank=1)
    log.scalars(1, {"loss": 1.0})
    assert log.images(1, "x", torch.zeros(1, 3, 2, 2)) is None
    log.close()
    assert not (tmp_path / "r1").exists()
    assert runlog.progress(range(3), rank=1).disable
