"""Sharded sample generation of the evaluate CLI: a 2-process CPU torchrun gives the single-process images.

The metrics step needs InceptionV3 weights, which test machines lack: the torchrun workers start through a
small launcher that swaps the same tiny stand-in feature network as tests/stage2_ar/test_stage2_eval.py into
``shared.inception.load_inception``.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import inception
from stage2_ar import evaluate as ev
from stage2_ar.generate import rank_batches
from stage2_ar.samples_npz import write_samples
from support.tiny_features import stand_in

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]

LAUNCHER = """\
import sys

sys.path.insert(0, {tests!r})
from shared import inception
from stage2_ar import evaluate
from support.tiny_features import stand_in

inception.load_inception = stand_in
sys.exit(evaluate.main(sys.argv[1:]))
"""


def test_rank_batches_split_the_single_process_batches():
    n, bs = 23, 4
    single = rank_batches(n, bs)
    assert single == [(s, min(s + bs, n)) for s in range(0, n, bs)]
    for world in (1, 2, 3, 5, 8):
        shares = [rank_batches(n, bs, r, world) for r in range(world)]
        assert sorted(b for share in shares for b in share) == single  # disjoint, same boundaries
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_merge_parts_orders_and_checks(tmp_path):
    imgs = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    ev._write_part(tmp_path, 0, 3, np.array([0, 1, 4]), imgs[[0, 1, 4]])
    ev._write_part(tmp_path, 1, 3, np.array([2, 3]), imgs[[2, 3]])
    ev._write_part(tmp_path, 2, 3, np.zeros(0, np.int64), np.zeros((0, 0, 0, 3), np.uint8))  # no batch
    assert np.array_equal(ev._merge_parts(tmp_path, 3, 5), imgs)
    with pytest.raises(SystemExit, match="hold 5 of 6"):
        ev._merge_parts(tmp_path, 3, 6)
    with pytest.raises(SystemExit, match="another run"):
        ev._merge_parts(tmp_path, 2, 5)
    ev._remove_parts(tmp_path, 3)
    assert not (tmp_path / "parts").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_evaluate_matches_single_process(tmp_path, monkeypatch, torchrun_cmd, tiny_checkpoints):
    torch.manual_seed(0)
    ar, tok = tiny_checkpoints  # non-zero heads so samples depend on the seed and the class
    write_samples(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))

    def args(out):  # 12 images in batches of 5, 5, 2: rank 0 gets batches 0 and 2, rank 1 batch 1
        return ["--ckpt", str(ar), "--tokenizer", str(tok), "--per-class", "3",
                "--classes", "0,1,2,3", "--batch-size", "5", "--seed", "42", "--ref", str(tmp_path / "ref.npz"),
                "--inception", "unused", "--out", str(out), "--device", "cpu"]

    monkeypatch.setattr(inception, "load_inception", stand_in)
    assert ev.main(args(tmp_path / "single")) == 0

    launcher = tmp_path / "launch_evaluate.py"
    launcher.write_text(LAUNCHER.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun_cmd + [str(launcher)] + args(tmp_path / "dist"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with np.load(tmp_path / "single" / "samples.npz") as a, np.load(tmp_path / "dist" / "samples.npz") as b:
        assert a.files == b.files == ["arr_0", "arr_1"]
        assert a["arr_0"].shape == (12, 8, 8, 3) and a["arr_0"].dtype == b["arr_0"].dtype == np.uint8
        assert np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["arr_1"], b["arr_1"])
        assert len({a["arr_0"][i].tobytes() for i in range(12)}) > 1  # not a degenerate constant sample
    assert not (tmp_path / "dist" / "parts").exists()  # parts merged and removed
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    dist = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert dist["settings"]["world_size"] == 2 and single["settings"]["world_size"] == 1
    assert dist["fid"] == pytest.approx(single["fid"]) and dist["num_samples"] == 12
