"""The README's demo command, end to end, in its --quick form (every step's real CLI, tiny sizes)."""
import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
REAL = Path("/usr/share/datasets/fashion-mnist")


def synthetic_fashion_mnist(root: Path) -> Path:
    """Four IDX files in Fashion-MNIST's format: class c is a bright bar at row 2c (a learnable signal)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        imgs = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            imgs[i, 2 * c + 4: 2 * c + 8, 4:24] = 220
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.tobytes())
    return root


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path):
    fm = REAL if (REAL / "train-images-idx3-ubyte.gz").is_file() else synthetic_fashion_mnist(tmp_path / "fm")
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out), "--fmnist-root", str(fm)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = (out / "summary.md").read_text()
    for row in ("tokenizer PSNR", "bytes per token (mds)", "AR final training loss", "sample grid"):
        assert row in summary
    ev = json.loads((out / "tokenizer-eval.json").read_text())
    assert ev["psnr"] > 0 and 0 < ev["codebook_usage"] <= 1
    manifest = json.loads((out / "tokens" / "manifest.json").read_text())
    assert manifest["num_classes"] == 10 and manifest["grid"] == [4, 4] and manifest["bits_per_token"] == 18
    # quick mode: 20 training images per class, two views each
    assert manifest["counts"]["train"]["rows"] == 10 * 20 * 2
    grid = np.asarray(Image.open(out / "samples" / "grid.png"))
    assert grid.shape[0] > grid.shape[1] * 2  # 10 rows (one per class) of 2 samples
    npz = np.load(out / "samples" / "samples.npz")
    assert npz["arr_0"].shape == (20, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
