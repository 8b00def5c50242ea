"""Stage-1 evaluation CLI: every metric computed or reported unavailable with its reason."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_tokenizer import evaluate, metrics
from stage1_tokenizer.config import PRESETS
from stage1_tokenizer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(3):
            (root / "data" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    torch.manual_seed(0)
    tok = Tokenizer(PRESETS["tokenizer-tiny"])
    tok.save(root / "ckpt")
    return root, tok


def test_cli_reports_metrics_and_unavailable_ones(setup, tmp_path, monkeypatch, capsys):
    root, tok = setup
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    out = tmp_path / "results.json"
    res = evaluate.main(["--ckpt", str(root / "ckpt"), "--data", str(root / "data"), "--resolution", "16",
                         "--workers", "0", "--batch-size", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["images"] == 6 and saved["tokens"] == 6 * 8 * 8
    assert set(saved["unavailable"]) == {"lpips_vgg", "lpips_alex", "rfid"}
    assert "at least 32 px" in saved["unavailable"]["lpips_alex"]
    assert "vgg16-397923af.pth" in saved["unavailable"]["lpips_vgg"]
    table = capsys.readouterr().out
    assert "psnr" in table and "unavailable" in table
    # independent recomputation of PSNR / usage from the same checkpoint and crops
    from stage1_tokenizer.data import ImageFolderDataset

    ds = ImageFolderDataset(root / "data", 16, train=False)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    idx = tok.encode(x)
    rec = tok.decode(idx).clamp(-1, 1)
    a, b = metrics.to_uint8(x), metrics.to_uint8(rec)
    mse = ((a.double() - b.double()) / 255).pow(2).flatten(1).mean(1)
    assert saved["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), abs=1e-4)
    assert saved["codes_used"] == len(set(idx.flatten().tolist()))
    assert res["ssim"] == saved["ssim"]


def test_required_metric_missing_is_an_error(setup, tmp_path, monkeypatch):
    root, _ = setup
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    with pytest.raises(SystemExit, match="error: .*InceptionV3"):
        evaluate.main(["--ckpt", str(root / "ckpt"), "--data", str(root / "data"), "--resolution", "16",
                       "--require", "rfid"])
    with pytest.raises(SystemExit, match="error: cannot load tokenizer"):
        evaluate.main(["--ckpt", str(tmp_path), "--data", str(root / "data"), "--resolution", "16"])
    with pytest.raises(SystemExit, match="not a multiple"):
        evaluate.main(["--ckpt", str(root / "ckpt"), "--data", str(root / "data"), "--resolution", "15"])


@pytest.mark.slow  # InceptionV3 at 299 px and two LPIPS trunks on CPU
def test_all_metrics_with_local_weight_files(setup, tmp_path):
    """LPIPS and rFID through their real loading code, fed with random weights in the expected formats."""
    from torchvision.models import alexnet
    from torchvision.models.vgg import cfgs, make_layers

    from support.random_inception import write_random_inception

    root, tok = setup
    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, vgg)
    alex = tmp_path / "alex.pth"
    torch.save({f"features.{k}": v for k, v in alexnet().features.state_dict().items()}, alex)
    inc = write_random_inception(tmp_path / "inception.pth")  # random weights, real format (no download)
    res = evaluate.main(["--ckpt", str(root / "ckpt"), "--data", str(root / "data"), "--resolution", "32",
                         "--workers", "0", "--limit", "2", "--inception", str(inc), "--lpips-weights", str(vgg),
                         "--lpips-alex-weights", str(alex), "--require", "rfid,lpips_vgg,lpips_alex"])
    assert res["unavailable"] == {}
    for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex", "rfid", "codebook_usage", "perplexity"):
        assert np.isfinite(res[k]), k
    assert res["rfid"] > 0 and res["lpips_vgg"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_thread")  # the torchrun workers' thread count: the same bits per image
def test_torchrun_shards_give_the_single_process_numbers(setup, tmp_path, torchrun_cmd):
    """Each of 2 gloo ranks takes every other image (3 and 2 of 5); sums, histogram and gathered features
    give one process's numbers. Batches of one image keep each image's arithmetic identical in both runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torchvision.models.vgg import cfgs, make_layers

    from support.random_inception import write_random_inception

    root, _ = setup
    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, vgg)
    inc = write_random_inception(tmp_path / "inception.pth")
    args = ["--ckpt", str(root / "ckpt"), "--data", str(root / "data"), "--resolution", "16", "--workers", "0",
            "--batch-size", "1", "--limit", "5", "--inception", str(inc), "--lpips-weights", str(vgg),
            "--require", "rfid,lpips_vgg", "--device", "cpu"]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    # The single process runs under the same OMP_NUM_THREADS as the ranks: the rFID's matrix square root of a
    # rank-deficient covariance amplifies the last bits of a differently threaded BLAS far beyond 1e-9.
    r = subprocess.run([sys.executable, "-m", "stage1_tokenizer.evaluate", *args, "--out", str(tmp_path / "one.json")],
                       cwd=repo, capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    r = subprocess.run(torchrun_cmd + ["-m", "stage1_tokenizer.evaluate", *args, "--out", str(tmp_path / "two.json")],
                       cwd=repo, capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    for k in ("images", "tokens", "codes_used", "codebook_usage", "perplexity"):  # one histogram: exact
        assert two[k] == one[k], k
    assert two["images"] == 5 and two["codes_used"] > 1
    for k in ("psnr", "ssim", "lpips_vgg"):  # the same per-image values, summed in another order
        assert two[k] == pytest.approx(one[k], rel=1e-12), k
    assert two["rfid"] == pytest.approx(one["rfid"], rel=1e-9) and one["rfid"] > 0
