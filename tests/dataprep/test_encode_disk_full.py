"""No space left on device in the encode job: at a chunk commit (Lance's append fails with the OS error in its
text) and at the final compaction. The job exits 1 with one line naming the dataset and the cause, nothing is
left looking complete (no manifest), and a rerun after space is freed completes to the same dataset as an
uninterrupted run (and removes the half-written files a kill during finalize leaves).
Publishing to a store that runs out of space is the same one line, with no manifest written."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.token_dataset import TokenDataset

REPO = Path(__file__).resolve().parents[2]
LANCE_FULL = ("LanceError(IO): Generic LocalFileSystem error: Unable to copy file from data/x.lance: "
              "No space left on device (os error 28)")

SITE = '''
import os
_where = os.environ.get("TEST_DISK_FULL")
if _where:
    def _full(*a, **k):
        raise OSError({full!r})
    if _where == "commit":  # the second chunk's Lance append
        from shared.token_dataset import writer
        _append, _calls = writer.append_lance, []

        def _second_fails(*a, **k):
            _calls.append(1)
            return _full() if len(_calls) == 2 else _append(*a, **k)
        writer.append_lance = _second_fails
    else:
        from dataprep import stores
        stores.LanceStore.compact = _full
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    from dataprep.sample_images import image_folder
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("inputs")
    image_folder(d / "data", classes=2, per_class=5)
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(d / "ckpt")
    (d / "site").mkdir()
    (d / "site" / "sitecustomize.py").write_text(SITE.format(full=LANCE_FULL))
    return d


def _encode(inputs, out, full=None):
    env = {k: v for k, v in os.environ.items() if k != "TEST_DISK_FULL"}
    env.update({"PYTHONPATH": f"{inputs / 'site'}:{REPO}", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    if full:
        env["TEST_DISK_FULL"] = full
    return subprocess.run([sys.executable, "dataprep/encode.py", "--data", inputs / "data", "--split", "train",
                           "--tokenizer", inputs / "ckpt", "--out", out, "--resolution", "16", "--views", "center",
                           "--chunk-size", "4", "--batch-size", "4", "--num-cpus", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _rows(root):
    ds = TokenDataset(root)
    lance = ds.read_lance()
    order = np.argsort(lance["id"])
    return ds.manifest.counts, [lance["id"][i] for i in order], lance["tokens"][order]


@pytest.mark.slow
def test_a_full_disk_stops_the_job_in_one_line_and_a_rerun_completes_it(inputs, tmp_path):
    ref = tmp_path / "reference"
    p = _encode(inputs, ref)
    assert p.returncode == 0, p.stderr[-3000:]
    for where in ("commit", "compact"):
        out = tmp_path / where
        p = _encode(inputs, out, full=where)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 1 and last == (f"error: {out}: no space left on device (free some space and run the "
                                              "same command again)"), p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        assert not (out / "manifest.json").exists()  # nothing looks complete
        # what a kill in the middle of finalize's atomic writes leaves: removed by the next start
        debris = [out / ".failures-train.tsv.k2x_9abc.tmp", out / "mds" / "train" / ".index.json.zz00yy11.tmp"]
        for f in debris:
            f.write_text("half")
        p = _encode(inputs, out)  # space freed
        assert p.returncode == 0, p.stderr[-3000:]
        assert not any(f.exists() for f in debris)
        counts, ids, tokens = _rows(out)
        ref_counts, ref_ids, ref_tokens = _rows(ref)
        assert counts == ref_counts and ids == ref_ids and np.array_equal(tokens, ref_tokens)


def test_publish_to_a_full_store_is_one_line_without_a_manifest(aws, tmp_path, monkeypatch):
    from dataprep import publish
    from support.s3_server import BUCKET
    from shared import object_store
    from support.synthetic_tokens import write_tokens

    root = tmp_path / "ds"
    write_tokens(root, {"train": (np.zeros((4, 16), np.int64), [0, 1, 2, 3])}, grid=(4, 4), num_classes=4)

    def full(path, uri, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(object_store, "upload_file", full)
    uri = f"s3://{BUCKET}/full"
    with pytest.raises(SystemExit) as e:
        publish.main([str(root), uri])
    assert str(e.value).startswith(f"error: {uri}/") and str(e.value).endswith(
        ": no space left on device (free some space and run the same command again)"), e.value
    assert "manifest.json" not in dict(object_store.list_objects(uri))
