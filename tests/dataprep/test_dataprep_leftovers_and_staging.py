"""Smaller robustness cases of the encode job: half-written files a kill during finalize leaves
(``.index.json.*.tmp``, ``.failures-<split>.tsv.*.tmp``) are removed at the next start, and only in a dataset
directory; a split whose every image failed (no row ever reached Lance) still gives a manifest; problems with
the staging directory of an s3:// --out name --staging, not --out."""
import os
import subprocess
import sys
from pathlib import Path

from dataprep import state as st

REPO = Path(__file__).resolve().parents[2]


def test_killed_writes_leave_nothing_the_next_start_keeps(tmp_path):
    root = tmp_path / "ds"
    (root / "mds" / "train").mkdir(parents=True)
    st.State.new(root, {}).save()
    debris = [root / ".failures-train.tsv.k2x_9abc.tmp", root / ".state.json.a1b2c3d4.tmp",
              root / "mds" / "train" / ".index.json.zz00yy11.tmp"]
    kept = [root / "failures-train.tsv", root / ".notes.tmp", root / "mds" / "train" / "index.json"]
    for p in debris + kept:
        p.write_text("x")
    assert sorted(st.remove_leftovers(root)) == sorted(debris)
    assert not any(p.exists() for p in debris) and all(p.exists() for p in kept)


def test_a_split_with_no_row_in_lance_still_gives_a_manifest(tmp_path):
    """Every image of the first split failed: chunks are committed, Lance was never written."""
    from shared.token_dataset import checksums

    root = tmp_path / "ds"
    root.mkdir()
    state = st.State.new(root, {})
    state.data["splits"]["train"] = {"run": {"num_images": 2}, "complete": False, "chunks": {"0": {
        "images": 2, "encoded": 0, "rows": 0, "failures": [["a.png", "bad"], ["b.png", "bad"]], "per_class": {},
        "commit": {"chunk": 0, "first": 0, "images": 2, "rows": 0, "rows_sha256": checksums.chunk_digest({}),
                   "paths_sha256": checksums.chunk_digest({}), "mds_index_sha256": "0" * 64}}}}
    commits = st.commits_of(state)
    assert commits["lance_version"] is None and commits["lance_files"] == {}
    assert [c["chunk"] for c in commits["splits"]["train"]["chunks"]] == [0]


def test_staging_problems_name_staging(s3, tmp_path):
    import torch

    from dataprep.sample_images import image_folder
    from support.s3_server import BUCKET
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    image_folder(tmp_path / "data", classes=2, per_class=2)
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"PYTHONPATH": str(REPO), **s3.env()})
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "state.json").write_text("{not json")
    for staging, what in ((a_file, f"error: --staging {a_file} exists and is not a directory"),
                          (damaged, f"error: --staging {damaged / 'state.json'} is damaged")):
        p = subprocess.run([sys.executable, "dataprep/encode.py", "--data", tmp_path / "data", "--split", "train",
                            "--tokenizer", tmp_path / "ckpt", "--out", f"s3://{BUCKET}/staged", "--staging", staging,
                            "--resolution", "16", "--num-cpus", "1"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
        err = p.stderr.strip().splitlines()  # after the job's log lines, one error line
        assert p.returncode == 1 and err[-1].startswith(what) and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert a_file.read_text() == "mine" and (damaged / "state.json").read_text() == "{not json"
