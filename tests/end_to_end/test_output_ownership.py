"""No tool replaces or deletes what it did not make: the ownership check of ``shared.atomic`` and every writer
of directories (checkpoints, both converters, the sampler / evaluator outputs, the trainers' run directory).

Each case names the data the tool used to destroy (an unrelated directory at the output path, a file there,
a user's file inside OUT/ar) and checks that it is still there, byte for byte, after a one-line refusal.
"""
from pathlib import Path

import pytest
import torch

from shared import checkpoint as ck
from shared.atomic import OutputError, atomic_dir, check_output_dir, check_output_file
from shared.device import init_distributed
from shared.run_config import RunConfig
from shared.training_run import TrainingRun
from stage1_tokenizer import convert_official as tok_convert
from stage1_tokenizer.config import PRESETS as TOK_PRESETS
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_ar import convert_official as ar_convert
from support.cli import no_model_loading

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "official" / "golden"
TOK_CKPT, AR_CKPT = GOLDEN / "tokenizer_tiny.ckpt", GOLDEN / "ar_tiny.ckpt"
AR_FLAGS = ["--grid", "4,4", "--head-dim", "16"]  # the golden AR file is not a released architecture

pytestmark = pytest.mark.usefixtures("one_thread")


def _someone_elses(path: Path) -> Path:
    """A directory of a user's own files at ``path``."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "todo.txt").write_text("mine\n")
    (path / "photo.png").write_bytes(b"\x89PNG not ours")
    return path


def _snapshot(path: Path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- shared.atomic


def test_atomic_dir_replaces_only_what_its_caller_owns(tmp_path):
    user = _someone_elses(tmp_path / "user")
    before = _snapshot(user)
    with pytest.raises(OutputError, match="already exists and is not this tool's output"):
        with atomic_dir(user) as tmp:
            raise AssertionError("the refusal comes before any work")
    assert _snapshot(user) == before
    (tmp_path / "file").write_text("a file")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        with atomic_dir(tmp_path / "file"):
            pass
    assert (tmp_path / "file").read_text() == "a file"
    (tmp_path / "link").symlink_to(user)
    with pytest.raises(OutputError, match="not a directory"):  # the link itself would have been replaced
        with atomic_dir(tmp_path / "link"):
            pass
    (tmp_path / "empty").mkdir()  # nothing to lose: replaced
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "x").write_text("new")
    assert (tmp_path / "empty" / "x").read_text() == "new"
    with atomic_dir(user, replace_if=lambda p: (p / "photo.png").exists()) as tmp:  # the caller's own product
        (tmp / "y").write_text("new")
    assert _snapshot(user) == {"y": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "link", "user"]  # no leftovers


def test_atomic_dir_checks_again_before_the_rename(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="not this tool's output"):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("new")
            _someone_elses(target)  # appeared while the tool worked
    assert (target / "notes" / "todo.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_checks_name_the_problem(tmp_path):
    never = lambda p: False
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*f/sub: .*f is a file, not a directory"):
        check_output_dir(tmp_path / "f" / "sub", owned=never)
    with pytest.raises(OutputError, match="is a directory: give the path of a file"):
        check_output_file(tmp_path, owned=never)
    with pytest.raises(OutputError, match="refusing to replace it"):
        check_output_file(tmp_path / "f", owned=never)
    assert check_output_file(tmp_path / "f", owned=lambda p: True) == tmp_path / "f"
    assert check_output_dir(tmp_path / "new" / "deeper", owned=never) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # a check creates nothing
    link = tmp_path / "runs"
    link.symlink_to(_someone_elses(tmp_path / "real"))
    assert check_output_dir(link, owned=lambda p: True, replaced=False) == link  # written into: a link is fine


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_replace_only_checkpoints_of_their_kind(tmp_path):
    ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, kind="toy")
    ck.save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, kind="toy")  # its own product: replaced
    assert torch.equal(ck.load_state_dict(tmp_path / "c")["w"], torch.zeros(2))
    with pytest.raises(OutputError, match="is not a 'other' checkpoint directory"):
        ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, kind="other")
    assert ck.load_meta(tmp_path / "c")["kind"] == "toy"
    user = _someone_elses(tmp_path / "user")
    before = _snapshot(user)
    with pytest.raises(OutputError, match="is not a 'tokenizer' checkpoint directory"):
        Tokenizer(TOK_PRESETS["tokenizer-tiny"]).save(user)
    assert _snapshot(user) == before
    (user / "config.json").write_text("{not json")  # a damaged config is nobody's checkpoint
    assert not ck.is_checkpoint(user, "tokenizer")
    Tokenizer(TOK_PRESETS["tokenizer-tiny"]).save(user, overwrite=True)
    assert ck.is_checkpoint(user, "tokenizer") and not (user / "notes").exists()


# ---------------------------------------------------------------------------------------------- converters


def test_tokenizer_converter_keeps_unrelated_outputs(tmp_path):
    user = _someone_elses(tmp_path / "user")
    before = _snapshot(user)
    with pytest.raises(SystemExit, match="error: .*user already exists and is not a 'tokenizer' checkpoint"):
        tok_convert.main([str(TOK_CKPT), str(user)])
    assert _snapshot(user) == before
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(SystemExit, match="error: .*a-file exists and is not a directory"):
        tok_convert.main([str(TOK_CKPT), str(tmp_path / "a-file")])
    assert (tmp_path / "a-file").read_text() == "keep me"
    tok_convert.main([str(TOK_CKPT), str(tmp_path / "tok")])
    tok_convert.main([str(TOK_CKPT), str(tmp_path / "tok"), "--weights", "raw"])  # its own output: replaced
    assert ck.load_meta(tmp_path / "tok")["extra"]["weights"] == "raw"
    tok_convert.main([str(TOK_CKPT), str(user), "--overwrite"])
    assert ck.is_checkpoint(user, "tokenizer")


def test_ar_converter_keeps_a_users_file_in_out_ar(tmp_path):
    out = tmp_path / "out"
    (out / "ar").mkdir(parents=True)
    (out / "ar" / "README.txt").write_text("my notes")
    with pytest.raises(SystemExit, match="error: .*ar already exists and is not a 'ar' checkpoint"):
        ar_convert.main([str(AR_CKPT), str(out), *AR_FLAGS])
    assert (out / "ar" / "README.txt").read_text() == "my notes" and not (out / "tokenizer").exists()
    (tmp_path / "file").write_text("keep")
    with pytest.raises(SystemExit, match="error: cannot write .*file/ar: .*file is a file"):
        ar_convert.main([str(AR_CKPT), str(tmp_path / "file"), *AR_FLAGS])
    assert (tmp_path / "file").read_text() == "keep"
    # a failing tokenizer half leaves nothing half-written: the AR half is saved only after both converted
    with pytest.raises(SystemExit, match="error: .*official raw tensors missing"):  # tokenizer-tiny is smaller
        ar_convert.main([str(AR_CKPT), str(tmp_path / "fresh"), *AR_FLAGS, "--tokenizer-preset", "tokenizer-tiny"])
    assert not (tmp_path / "fresh").exists()
    assert ar_convert.main([str(AR_CKPT), str(tmp_path / "ok"), *AR_FLAGS]) == 0
    assert ar_convert.main([str(AR_CKPT), str(tmp_path / "ok"), *AR_FLAGS]) == 0  # its own output: replaced
    assert ar_convert.main([str(AR_CKPT), str(out), *AR_FLAGS, "--overwrite"]) == 0
    assert ck.is_checkpoint(out / "ar", "ar") and ck.is_checkpoint(out / "tokenizer", "tokenizer")


# ---------------------------------------------------------------------------------------------- sample / evaluate


def test_sample_and_evaluate_refuse_someone_elses_directory_before_any_work(tmp_path, monkeypatch,
                                                                            tiny_checkpoints):
    from stage2_ar import evaluate, sample

    ar, tok = tiny_checkpoints
    user = _someone_elses(tmp_path / "user")
    before = _snapshot(user)
    (tmp_path / "file").write_text("keep")
    base = ["--ckpt", str(ar), "--tokenizer", str(tok), "--classes", "0", "--per-class", "4"]
    with monkeypatch.context() as m:
        no_model_loading(m)
        for out, msg in ((user, "user already exists and is not an output directory of stage2_ar.sample"),
                         (tmp_path / "file", "file exists and is not a directory")):
            with pytest.raises(SystemExit, match=f"error: .*{msg}"):
                sample.main(base + ["--out", str(out)])
            with pytest.raises(SystemExit, match=f"error: .*{msg}"):
                evaluate.main(base + ["--ref", str(tmp_path / "ref.npz"), "--out", str(out)])
    assert _snapshot(user) == before and (tmp_path / "file").read_text() == "keep"
    # the sampler's own output directory may be written again, and --overwrite allows other files (kept)
    assert sample.main(base + ["--out", str(tmp_path / "s")]) == 0
    assert sample.main(base + ["--out", str(tmp_path / "s"), "--npz"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grid.png", "samples.npz"]
    assert sample.main(base + ["--out", str(user), "--overwrite"]) == 0
    assert {k: v for k, v in _snapshot(user).items() if k != "grid.png"} == before


# ---------------------------------------------------------------------------------------------- trainers


def test_training_run_checks_out_dir_on_entry(tmp_path):
    info = init_distributed("cpu")
    (tmp_path / "file").write_text("keep")
    for out, msg in ((tmp_path / "file", "exists and is not a directory"),
                     (tmp_path / "file" / "run", "file is a file, not a directory")):
        with pytest.raises(OutputError, match=msg):
            with TrainingRun(RunConfig(out_dir=str(out), tensorboard=False), info):
                raise AssertionError("refused on entry")
    assert (tmp_path / "file").read_text() == "keep"
    user = _someone_elses(tmp_path / "run")  # a run directory only gains files: any directory will do
    with TrainingRun(RunConfig(out_dir=str(user), tensorboard=False), info):
        pass


def test_trainers_refuse_a_file_as_out_dir_in_one_line(tmp_path, photos, token_dataset):
    from stage1_tokenizer.train import main as train1
    from stage2_ar.train import main as train2

    (tmp_path / "out").write_text("keep")
    for main, args in ((train1, ["--config", "tokenizer-tiny", f"data.root={photos}", "max_steps=1"]),
                       (train2, ["--config", "ar-tiny", f"data.path={token_dataset(32)}"])):
        with pytest.raises(SystemExit, match="error: .*out exists and is not a directory"):
            main(args + [f"out_dir={tmp_path / 'out'}"])
    assert (tmp_path / "out").read_text() == "keep"
