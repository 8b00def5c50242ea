"""inspect_dataset: the decoded grid is written only where --grid asks, --help is the whole description,
and --verify reports the rows of each split per store (a split's rows are stored once in each store)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataprep import inspect_dataset
from support.synthetic_tokens import write_tokens

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect") / "ds"
    rng = np.random.default_rng(0)
    write_tokens(root, {"train": (rng.integers(0, 1 << 18, (10, 16)), np.arange(10) % 2),
                        "val": (rng.integers(0, 1 << 18, (4, 16)), np.arange(4) % 2)}, grid=(4, 4), num_classes=2)
    return root


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_grid_is_written_only_where_asked(ds, tmp_path, monkeypatch, capsys):
    calls = []

    def decode(dataset, ckpt, out, n, split):  # stands in for the tokenizer: records where it would write
        calls.append((ckpt, out, n, split))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"png")
        return out

    monkeypatch.setattr(inspect_dataset, "decode_grid", decode)
    monkeypatch.chdir(tmp_path)
    tok = tmp_path / "tok"
    before = _files(ds)
    assert inspect_dataset.main([str(ds), "--tokenizer", str(tok)]) == 0
    assert calls == [] and _files(ds) == before and _files(tmp_path) == []  # nothing written anywhere
    assert "decoded grid: skipped (not asked; --grid PATH writes one)" in capsys.readouterr().out
    grid = tmp_path / "grids" / "rows.png"
    assert inspect_dataset.main([str(ds), "--tokenizer", str(tok), "--grid", str(grid), "--rows", "3"]) == 0
    assert calls == [(tok, grid, 3, None)] and _files(ds) == before
    assert f"decoded grid: {grid}" in capsys.readouterr().out


def test_help_is_complete_and_names_grid_and_verify():
    r = subprocess.run([sys.executable, "-m", "dataprep.inspect_dataset", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    first = " ".join(inspect_dataset.__doc__.split("\n\n")[0].split())
    assert first.endswith(".") and first in text  # the first paragraph whole, not cut at a line end
    assert "--grid PATH" in text and "nothing is written without it" in text and "per store" in text


def test_verify_reports_rows_per_split_and_per_store(ds, capsys):
    assert inspect_dataset.main([str(ds), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"verified {ds}: 28 rows of 2 splits read, counting both stores; split train: 10 rows (Lance 10, MDS 10); " \
           "split val: 4 rows (Lance 4, MDS 4); all match" in out
