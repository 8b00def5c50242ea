"""Which tokenizer weight set made a dataset's tokens: raw (what the official AR recipe encodes with) or EMA
(what reconstruction evaluation uses). The encode job takes a Stage-1 run's raw set by default and records the
set it used; Stage 2 keeps it and refuses to decode tokens of one set with the other unless told to."""
import shutil

import numpy as np
import pytest
import torch

from dataprep import encode, state
from dataprep.sample_images import image_folder
from shared import checkpoint as ck
from shared import token_dataset as td
from shared.token_dataset.checksums import checkpoint_sha256
from shared.token_dataset.provenance import tokenizer_weights
from shared.token_dataset.writer import write_dataset
from stage1_tokenizer.config import PRESETS as TOK_PRESETS
from stage1_tokenizer.exports import select
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_ar import sample
from support.cli import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = TOK_PRESETS["tokenizer-tiny"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Stage-1 run directory as the trainer leaves it (final/: EMA, final-raw/: raw, different weights), a
    checkpoint that does not say which set it holds, and two images."""
    root = tmp_path_factory.mktemp("weight-sets")
    torch.manual_seed(0)
    for weights, name in (("ema", "final"), ("raw", "final-raw")):
        Tokenizer(TINY).save(root / "run" / name, extra={"step": 4, "weights": weights, "source": weights})
    (root / "run" / "config.yaml").write_text("seed: 0\n")
    Tokenizer(TINY).save(root / "unsaid")
    image_folder(root / "data", classes=2, per_class=1)
    return root


def test_checkpoints_say_which_set_they_hold(world):
    run = world / "run"
    assert tokenizer_weights(run / "final") == "ema" and tokenizer_weights(run / "final-raw") == "raw"
    assert tokenizer_weights(world / "unsaid") is None and tokenizer_weights(world / "nowhere") is None
    legacy = world / "legacy-export"  # a Stage-1 export from before the field: extra.source "ema"
    Tokenizer(TINY).save(legacy, extra={"step": 4, "source": "ema"})
    assert tokenizer_weights(legacy) == "ema"


def test_select_takes_the_raw_set_of_a_run_by_default(world, tmp_path):
    run = world / "run"
    assert select(run) == (run / "final-raw", "raw")
    assert select(run, "ema") == (run / "final", "ema")
    assert select(run / "final") == (run / "final", "ema")  # a checkpoint directory is taken as it is
    with pytest.raises(ValueError, match=r"final holds the ema weights, not the raw ones --tokenizer-weights asks"):
        select(run / "final", "raw")
    assert select(world / "unsaid") == (world / "unsaid", None)
    assert select(world / "unsaid", "raw") == (world / "unsaid", "raw")  # the user says which
    old = tmp_path / "old-run"  # a run from before both sets were exported: final/ only
    shutil.copytree(run / "final", old / "final")
    with pytest.raises(ValueError, match=r"old-run is a Stage-1 run without final-raw/.*--tokenizer-weights ema"):
        select(old)
    assert select(old, "ema") == (old / "final", "ema")


def _encode_until_ray(world, out, monkeypatch, *extra):
    """Run the encode job up to the point where it would encode (its settings are recorded by then)."""
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode, "start_ray", lambda args: "existing")
    monkeypatch.setattr(encode, "encode_chunks", stop)
    args = ["--data", world / "data", "--out", out, "--resolution", "16", "--chunk-size", "1", *extra]
    assert encode.main([str(a) for a in args]) == 130
    return state.State.load(out)


def test_encode_records_the_set_and_takes_raw_from_a_run(world, tmp_path, monkeypatch, caplog):
    run = world / "run"
    st = _encode_until_ray(world, tmp_path / "raw", monkeypatch, "--tokenizer", run)
    tok = st.settings["tokenizer"]
    assert tok["weights"] == "raw" and tok["checkpoint_sha256"] == checkpoint_sha256(run / "final-raw")
    assert st.data["tokenizer_path"] == str((run / "final-raw").resolve())
    counts = {"train": td.SplitCounts(images=2, encoded_images=0, failed_images=0, rows=0, per_class={},
                                      complete=False)}
    assert td.Manifest.from_settings(st.settings, counts=counts).tokenizer["weights"] == "raw"  # validated
    assert "official AR recipe" not in caplog.text
    caplog.clear()

    st = _encode_until_ray(world, tmp_path / "ema", monkeypatch, "--tokenizer", run, "--tokenizer-weights", "ema")
    assert st.settings["tokenizer"]["weights"] == "ema"
    assert st.settings["tokenizer"]["checkpoint_sha256"] == checkpoint_sha256(run / "final")
    assert "the official AR recipe encodes with the raw ones" in caplog.text

    st = _encode_until_ray(world, tmp_path / "said", monkeypatch, "--tokenizer", world / "unsaid",
                           "--tokenizer-weights", "raw")
    assert st.settings["tokenizer"]["weights"] == "raw"
    st = _encode_until_ray(world, tmp_path / "unsaid", monkeypatch, "--tokenizer", world / "unsaid")
    assert "weights" not in st.settings["tokenizer"]
    assert "does not record which weight set it holds" in caplog.text

    with pytest.raises(SystemExit, match=r"^error: --tokenizer .*final holds the ema weights, not the raw ones"):
        encode.main(["--data", str(world / "data"), "--out", str(tmp_path / "no"), "--resolution", "16",
                     "--tokenizer", str(run / "final"), "--tokenizer-weights", "raw"])
    assert not (tmp_path / "no").exists()


def test_manifest_refuses_an_unknown_weight_set(tmp_path):
    tokens, labels = np.zeros((2, 16), np.int64), np.arange(2)
    with pytest.raises(td.ManifestError, match="tokenizer.weights must be one of raw, ema, got 'both'"):
        write_dataset(tmp_path / "d", {"train": (tokens, labels)}, grid=(4, 4), classes=["a", "b"], resolution=8,
                      tokenizer={"preset": "tokenizer-tiny", "config": {}, "checkpoint_sha256": "0" * 64,
                                 "weights": "both"})


def test_stage2_refuses_to_decode_raw_tokens_with_the_ema_set(world, tmp_path):
    from stage2_ar.train import main as train_main

    run = world / "run"
    tokens = np.random.default_rng(0).integers(0, 1 << 18, (20, 16))
    write_dataset(tmp_path / "data", {"train": (tokens, np.arange(20) % 10)}, grid=(4, 4),
                  classes=[f"c{i}" for i in range(10)], resolution=8,
                  tokenizer={"preset": "tokenizer-tiny", "config": {}, "weights": "raw",
                             "checkpoint_sha256": checkpoint_sha256(run / "final-raw")})
    record = td.tokens_record(td.read_manifest(tmp_path / "data"))
    assert record["tokenizer_weights"] == "raw"
    td.check_tokenizer(record, run / "final-raw", downsample_factor=2)
    with pytest.raises(td.ManifestError) as e:
        td.check_tokenizer(record, run / "final", allow="--switch")
    msg = str(e.value)
    assert "\n" not in msg and "the tokens were encoded with the raw weights" in msg
    assert "this is the EMA set" in msg and msg.endswith("(pass --switch to use it anyway)")

    common = ["--config", "ar-tiny", f"data.path={tmp_path / 'data'}", "data.clean_stale_shm=false",
              "schedule.max_steps=1", "sample_every=1", "sample_per_class=1"]
    one_line_error(train_main, common + [f"out_dir={tmp_path / 'bad'}", f"tokenizer={run / 'final'}"],
                   match=r"encoded with the raw weights .*this is the EMA set.*allow_tokenizer_mismatch=true")
    assert train_main(common + [f"out_dir={tmp_path / 'ar'}", f"tokenizer={run / 'final'}",
                                "allow_tokenizer_mismatch=true"]) == 0  # a deliberate swap
    ar = tmp_path / "ar" / "step-00000001"
    assert ck.load_meta(ar)["extra"]["tokens"]["tokenizer_weights"] == "raw"  # the run keeps the set
    args = ["--ckpt", str(ar), "--classes", "0", "--per-class", "1"]
    one_line_error(sample.main, args + ["--tokenizer", str(run / "final"), "--out", str(tmp_path / "s")],
                   match=r"encoded with the raw weights .*this is the EMA set.*--allow-tokenizer-mismatch")
    assert not (tmp_path / "s").exists()
    assert sample.main(args + ["--tokenizer", str(run / "final-raw"), "--out", str(tmp_path / "ok")]) == 0
    assert sample.main(args + ["--tokenizer", str(run / "final"), "--allow-tokenizer-mismatch",
                               "--out", str(tmp_path / "swap")]) == 0
    assert (tmp_path / "ok" / "grid.png").is_file() and (tmp_path / "swap" / "grid.png").is_file()
