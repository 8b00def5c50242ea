"""experiments.run follows the project's rules: every argument is checked before any work and refused in one
line naming the option; it never deletes or replaces what it did not make (a marker file tells its own
outputs), and replaces its own outputs of another configuration only with --overwrite."""
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.run import MARK

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.run", "--smoke", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(p, code, text):
    err = p.stderr.strip()
    assert p.returncode == code and err.startswith("error: ") and len(err.splitlines()) == 1, p.stderr[-3000:]
    assert text in err, err


def test_a_users_directory_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "holiday.jpg").write_bytes(b"mine")
    p = _run("tok-bicubic", "--out", out)
    _one_line(p, 1, f"--out {out} holds files this tool did not make (photos)")
    assert (out / "photos" / "holiday.jpg").read_bytes() == b"mine" and sorted(out.iterdir()) == [out / "photos"]
    p = _run("tok-bicubic", "--out", out, "--overwrite")  # not even with --overwrite: it is not its own
    _one_line(p, 1, "holds files this tool did not make")
    assert (out / "photos" / "holiday.jpg").read_bytes() == b"mine"


@pytest.mark.parametrize("args, code, text", [
    (["--threads", "0"], 2, "argument --threads: expected a positive integer, got '0'"),
    (["--seeds", "a"], 2, "argument --seeds: expected comma-separated integers, got 'a'"),
    (["--out", "README.md"], 1, "README.md is a file, not a directory"),
    (["--out", "/proc/no-such/abl"], 1, "/proc is not writable"),
    (["--fmnist-root", "/nonexistent"], 1, "--fmnist-root /nonexistent: no Fashion-MNIST IDX files there"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, args, code, text):
    if "--out" not in args:
        args = args + ["--out", tmp_path / "out"]
    p = _run("tok-bicubic", "ar-intra2", *args, timeout=120)
    _one_line(p, code, text)
    assert not (tmp_path / "out").exists() and "tokenizer" not in p.stdout


def _own_photos_of_another_config(out: Path) -> Path:
    photos = out / "photos"
    photos.mkdir(parents=True)
    for d in (out, photos):
        (d / MARK).write_text("made by python -m experiments.run\n")
    (photos / "config.json").write_text('{"size": 999}\n')
    (photos / "counts.json").write_text("{}\n")
    return photos


def test_own_outputs_of_another_config_need_overwrite(tmp_path):
    out = tmp_path / "out"
    photos = _own_photos_of_another_config(out)
    p = _run("tok-bicubic", "--out", out, timeout=300)
    _one_line(p, 1, f"{photos} holds an output of another configuration; pass --overwrite")
    assert (photos / "config.json").read_text() == '{"size": 999}\n'


@pytest.mark.slow
def test_overwrite_replaces_own_outputs(tmp_path):
    out = tmp_path / "out"
    photos = _own_photos_of_another_config(out)
    p = _run("tok-bicubic", "--out", out, "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (photos / "config.json").read_text() != '{"size": 999}\n' and (photos / "train").is_dir()
    assert (out / "tables.md").is_file() and (photos / MARK).is_file()
