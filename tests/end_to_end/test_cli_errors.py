"""Bad input to every command-line tool ends in one ``error:`` line and a non-zero exit, before any work.

Classes of the audit (docs/robustness.md lists every case): damaged checkpoints (truncated weights, a refused
trainer_state.pt, a broken config.json) in every tool that loads one, damaged --inception files, sampling
settings that used to sample silently wrong, too few images for precision / recall, a tokenizer that is not
the token dataset's, and outputs that are files or read-only. Most cases call the CLI's ``main`` in process;
the ``slow`` ones start the real commands (exit status, stderr without a traceback), and the read-only ones
run as an unprivileged user, since root writes into read-only directories.
"""
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import checkpoint as ck
from shared import inception
from shared import token_dataset as td
from shared.token_dataset.checksums import checkpoint_sha256
from shared.token_dataset.writer import write_dataset
from shared.config import to_dict
from stage1_tokenizer.config import PRESETS as TOK_PRESETS
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_ar import evaluate, sample
from stage2_ar.generate import generate
from stage2_ar.model import FactorizedAR
from stage2_ar.samples_npz import write_samples
from support.cli import no_model_loading, one_line_error
from support.tiny_features import stand_in

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "official" / "golden"

pytestmark = pytest.mark.usefixtures("one_thread")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _code_pickle(path: Path) -> None:
    """A pickle that names a global outside torch's weights-only allow list (stands in for code)."""
    import datetime

    with open(path, "wb") as f:
        pickle.dump({"step": 1, "when": datetime.datetime(2024, 1, 1)}, f)


@pytest.fixture
def pair(tiny_checkpoints):
    """A tiny AR checkpoint and a tiny tokenizer checkpoint (no training behind them): conftest's, shared."""
    return tiny_checkpoints


def _damaged_copies(src: Path, root: Path) -> dict:
    """Copies of checkpoint ``src``: truncated weights, a truncated config.json, a config.json without a kind."""
    out = {}
    for name in ("weights", "config", "nokind"):
        d = root / f"{src.name}-{name}"
        shutil.copytree(src, d)
        out[name] = d
    _truncate(out["weights"] / ck.WEIGHTS)
    _truncate(out["config"] / ck.CONFIG)
    meta = json.loads((out["nokind"] / ck.CONFIG).read_text())
    del meta["kind"]
    (out["nokind"] / ck.CONFIG).write_text(json.dumps(meta))
    return out


DAMAGE = {"weights": r"model.safetensors is damaged", "config": r"config.json is damaged",
          "nokind": r"config.json is damaged: no kind"}


# ---------------------------------------------------------------------------------------------- sampling settings


BAD_SAMPLING = [  # (generate() keyword, value, CLI flags, message)
    ("top_p", 0.0, ["--top-p", "0"], r"top_p must lie in \(0, 1\]"),
    ("top_p", -0.5, ["--top-p", "-0.5"], r"top_p must lie in \(0, 1\]"),
    ("top_p", 1.5, ["--top-p", "1.5"], r"top_p must lie in \(0, 1\]"),
    ("top_p", float("nan"), ["--top-p", "nan"], r"top_p must lie in \(0, 1\]"),
    ("temperatures", -1.0, ["--temperature", "-1"], r"temperature must be >= 0"),
    ("temperatures", (1.0, float("inf")), ["--temperature", "1,inf"], r"temperature must be >= 0 .* finite"),
    ("top_k", -3, ["--top-k", "-3"], r"top_k must be an integer >= 0"),
    ("cfg_scales", float("nan"), ["--cfg", "nan"], r"CFG scale must be a finite number"),
    ("cfg_scales", (2.0, float("inf")), ["--cfg", "2,inf"], r"CFG scale must be a finite number"),
]


@pytest.mark.parametrize("key,value,flags,msg", BAD_SAMPLING, ids=[" ".join(c[2]) for c in BAD_SAMPLING])
def test_bad_sampling_settings_are_refused(key, value, flags, msg, pair, tmp_path, monkeypatch):
    ar, tok = pair
    model = FactorizedAR.from_checkpoint(ar)
    with pytest.raises(ValueError, match=msg):  # the library entry point: top_p 0 gave all-zero grids
        generate(model, torch.tensor([0, 1]), **{key: value}, generator=torch.Generator().manual_seed(0))
    no_model_loading(monkeypatch)
    base = ["--ckpt", str(ar), "--tokenizer", str(tok), "--per-class", "4"]
    one_line_error(sample.main, base + ["--classes", "0", "--out", str(tmp_path / "s"), *flags], match=msg)
    one_line_error(evaluate.main, base + ["--classes", "0", "--ref", "r.npz", "--out", str(tmp_path / "e"), *flags],
                   match=msg)
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_valid_edge_settings_still_sample(pair):
    model = FactorizedAR.from_checkpoint(pair[0])
    g = lambda: torch.Generator().manual_seed(0)
    greedy = generate(model, torch.tensor([3]), temperatures=0.0, generator=g())
    assert torch.equal(greedy, generate(model, torch.tensor([3]), top_k=1, generator=g()))  # both argmax
    nucleus = generate(model, torch.tensor([3]), top_p=1e-9, generator=g())  # only the top token survives
    assert torch.equal(nucleus, greedy)


def test_seed_that_overflows_the_generator_is_refused(pair, tmp_path, monkeypatch):
    no_model_loading(monkeypatch)
    base = ["--ckpt", str(pair[0]), "--tokenizer", str(pair[1]), "--classes", "0", "--out", str(tmp_path / "s")]
    one_line_error(sample.main, base + ["--seed", "-1"], match=r"--seed must lie in \[0, ")
    one_line_error(sample.main, base + ["--seed", str(2 ** 64)], match=r"--seed must lie in \[0, ")


# ---------------------------------------------------------------------------------------------- damaged checkpoints


def test_sample_and_evaluate_refuse_damaged_checkpoints(pair, tmp_path, monkeypatch):
    ar, tok = pair
    monkeypatch.setattr(inception, "load_inception", stand_in)
    write_samples(tmp_path / "ref.npz", np.zeros((8, 8, 8, 3), np.uint8))
    for which, src in (("AR", ar), ("tokenizer", tok)):
        for damage, path in _damaged_copies(src, tmp_path).items():
            ckpt, tokenizer = (path, tok) if which == "AR" else (ar, path)
            args = ["--ckpt", str(ckpt), "--tokenizer", str(tokenizer), "--classes", "0", "--per-class", "4"]
            match = f"cannot load {which} checkpoint: .*{DAMAGE[damage]}"
            one_line_error(sample.main, args + ["--out", str(tmp_path / "s")], match=match)
            one_line_error(evaluate.main, args + ["--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "e")],
                           match=match)
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_stage1_evaluate_refuses_a_damaged_tokenizer(pair, tmp_path, photos):
    from stage1_tokenizer import evaluate as tok_eval

    for damage, path in _damaged_copies(pair[1], tmp_path).items():
        one_line_error(tok_eval.main, ["--ckpt", str(path), "--data", str(photos), "--resolution", "16",
                                       "--out", str(tmp_path / "r.json")], match=DAMAGE[damage])
    assert not (tmp_path / "r.json").exists()


def test_converters_refuse_truncated_official_files(tmp_path):
    from stage1_tokenizer import convert_official as tok_convert
    from stage2_ar import convert_official as ar_convert

    for name, main in (("tokenizer_tiny.ckpt", tok_convert.main), ("ar_tiny.ckpt", ar_convert.main)):
        shutil.copy(GOLDEN / name, tmp_path / name)
        _truncate(tmp_path / name)
        one_line_error(main, [str(tmp_path / name), str(tmp_path / f"out-{name}")], match="refusing to load")
        assert not (tmp_path / f"out-{name}").exists()
    one_line_error(tok_convert.main, [str(tmp_path), str(tmp_path / "o")], match="no such file")  # a directory


def test_bad_numbers_and_outputs_of_the_other_tools(pair, tmp_path, photos):
    from stage1_tokenizer import evaluate as tok_eval
    from stage2_ar import convert_official as ar_convert

    ar_args = [str(GOLDEN / "ar_tiny.ckpt"), str(tmp_path / "c")]
    one_line_error(ar_convert.main, ar_args + ["--grid", "0,4", "--head-dim", "16"], match="--grid sides must be")
    one_line_error(ar_convert.main, ar_args + ["--grid", "4", "--head-dim", "16"], match="--grid takes H,W")
    one_line_error(ar_convert.main, ar_args + ["--grid", "4,4", "--head-dim", "0"], match="--head-dim must be")
    one_line_error(ar_convert.main, ar_args + ["--grid", "4,4", "--head-dim", "6"], match="multiple of head_dim 6")
    one_line_error(ar_convert.main, ar_args + ["--tokenizer-preset", "nope"], match="unknown tokenizer preset 'nope'")
    assert not (tmp_path / "c").exists()
    base = ["--ckpt", str(pair[1]), "--data", str(photos), "--workers", "0"]
    for flags, match in ((["--resolution", "0"], "--resolution must be positive"),
                         (["--resolution", "16", "--batch-size", "0"], "--batch-size must be positive"),
                         (["--resolution", "16", "--limit", "0"], "--limit must be positive"),
                         (["--resolution", "16", "--workers", "-1"], "--workers must be >= 0")):
        one_line_error(tok_eval.main, base + flags, match=match)
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    one_line_error(tok_eval.main, base + ["--resolution", "16", "--out", str(tmp_path / "notes.json")],
                   match="notes.json already exists and is not a results file of stage1_tokenizer.evaluate")
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    out = ["--resolution", "16", "--limit", "4", "--out", str(tmp_path / "r.json")]
    tok_eval.main(base + out)
    tok_eval.main(base + out)  # its own results: replaced
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 4


def test_stage1_evaluate_damaged_trunk_and_too_few_images_for_rfid(pair, tmp_path, photos):
    from support.random_inception import write_random_inception
    from stage1_tokenizer import evaluate as tok_eval

    base = ["--ckpt", str(pair[1]), "--data", str(photos), "--resolution", "16", "--workers", "0"]
    (tmp_path / "vgg16.pth").write_bytes(b"not a checkpoint")
    one_line_error(tok_eval.main, base + ["--lpips-weights", str(tmp_path / "vgg16.pth")],
                   match=r"lpips_vgg: cannot use .*vgg16.pth: ")
    weights = write_random_inception(tmp_path / "inception.pth")
    one_line_error(tok_eval.main, base + ["--limit", "1", "--inception", str(weights), "--require", "rfid"],
                   match="rFID needs at least 2 images, the data gives 1")
    res = tok_eval.main(base + ["--limit", "1", "--inception", str(weights)])
    assert res["images"] == 1 and "rfid" not in res and "at least 2 images" in res["unavailable"]["rfid"]


@pytest.fixture
def shards(token_dataset):
    """32 images of random 4x4 grids, 10 classes (conftest's token_dataset, shared by the session)."""
    return token_dataset(32)


def _resume_cases(src: Path, root: Path) -> dict:
    """A training checkpoint with truncated weights, and one whose trainer_state.pt pickles a refused global."""
    weights, state = root / "weights" / src.name, root / "state" / src.name
    shutil.copytree(src, weights)
    shutil.copytree(src, state)
    _truncate(weights / ck.WEIGHTS)
    _code_pickle(state / ck.TRAINER_STATE)
    return {weights: "model.safetensors is damaged", state: "refusing .*trainer_state.pt"}


def _assert_untouched(out: Path) -> None:
    """A refused resume leaves no run files that look like a started run."""
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
    assert not any(out.glob("step-*")) if out.exists() else True


def test_stage2_train_refuses_a_damaged_resume_checkpoint(shards, tmp_path):
    from stage2_ar.train import main
    from stage2_ar.train_config import PRESETS

    src = tmp_path / "step-00000001"
    model = FactorizedAR(PRESETS["ar-tiny"].model)
    ck.save_checkpoint(src, model.state_dict(), to_dict(PRESETS["ar-tiny"].model), kind="ar",
                       trainer_state={"step": 1})
    for path, match in _resume_cases(src, tmp_path).items():
        out = tmp_path / f"run-{path.parent.name}"
        one_line_error(main, ["--config", "ar-tiny", f"data.path={shards}", f"out_dir={out}", f"resume={path}",
                              "data.clean_stale_shm=false"], match=match)
        _assert_untouched(out)


def test_stage1_train_refuses_a_damaged_resume_checkpoint(photos, tmp_path):
    from shared.config import resolve
    from shared.device import init_distributed
    from stage1_tokenizer.train import Trainer, main
    from stage1_tokenizer.train_config import PRESETS, TrainConfig

    args = [f"data.root={photos}", "loss.perceptual_weight=0"]
    Trainer(resolve(TrainConfig, PRESETS, "tokenizer-tiny", args + [f"out_dir={tmp_path / 'src'}"]),
            init_distributed("cpu")).save()  # a real training checkpoint of step 0
    for path, match in _resume_cases(tmp_path / "src" / "step-00000000", tmp_path).items():
        out = tmp_path / f"run-{path.parent.name}"
        one_line_error(main, ["--config", "tokenizer-tiny", *args, f"out_dir={out}", f"resume={path}"], match=match)
        _assert_untouched(out)


def test_stage1_train_refuses_a_foreign_final_dir_before_training(photos, tmp_path):
    from stage1_tokenizer.train import main

    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "notes.txt").write_text("mine")
    one_line_error(main, ["--config", "tokenizer-tiny", f"data.root={photos}", "loss.perceptual_weight=0",
                          f"out_dir={out}"], match="final")
    assert sorted(p.name for p in out.iterdir()) == ["final"]  # no step was trained, nothing written
    assert (out / "final" / "notes.txt").read_text() == "mine"


def test_evaluate_refuses_damaged_inception_files(tmp_path):
    from support.random_inception import write_random_inception

    good = write_random_inception(tmp_path / "good.pth")
    shutil.copy(good, tmp_path / "truncated.pth")
    _truncate(tmp_path / "truncated.pth")
    _code_pickle(tmp_path / "code.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    write_samples(tmp_path / "s.npz", np.zeros((8, 8, 8, 3), np.uint8))
    for name, match in (("truncated.pth", "is damaged or not a plain tensor checkpoint: RuntimeError"),
                        ("code.pth", "holds other Python objects .*could run code"),
                        ("empty.pth", "is damaged or not a plain tensor checkpoint: EOFError")):
        one_line_error(evaluate.main, ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                                       "--inception", str(tmp_path / name), "--out", str(tmp_path / "e")], match=match)
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------- too few images


def test_evaluate_refuses_too_few_images_before_sampling(pair, tmp_path, monkeypatch):
    ar, tok = pair
    monkeypatch.setattr(inception, "load_inception", stand_in)
    write_samples(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    write_samples(tmp_path / "three.npz", np.zeros((3, 8, 8, 3), np.uint8))
    gen = ["--ckpt", str(ar), "--tokenizer", str(tok), "--out", str(tmp_path / "e")]
    one_line_error(evaluate.main, gen + ["--classes", "0", "--per-class", "3", "--ref", str(tmp_path / "ref.npz")],
                   match=r"\(1 x 3\) has 3 image\(s\); precision / recall \(k = 3\) need at least 4")
    one_line_error(evaluate.main, gen + ["--classes", "0", "--per-class", "4", "--ref", str(tmp_path / "three.npz")],
                   match=r"reference batch .*three.npz has 3 image\(s\)")
    one_line_error(evaluate.main, ["--samples", str(tmp_path / "three.npz"), "--ref", str(tmp_path / "ref.npz"),
                                   "--out", str(tmp_path / "e")], match="--samples .*three.npz has 3 image")
    assert not (tmp_path / "e").exists()  # nothing sampled, no samples.npz left looking complete
    assert evaluate.main(gen + ["--classes", "0", "--per-class", "4", "--ref", str(tmp_path / "ref.npz")]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_samples"] == 4


# ---------------------------------------------------------------------------------------------- tokenizer identity


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A token dataset recorded as encoded by tokenizer A, and another tokenizer B of the same shape."""
    root = tmp_path_factory.mktemp("encoded")
    torch.manual_seed(1)
    Tokenizer(TOK_PRESETS["tokenizer-tiny"]).save(root / "tok-a")
    Tokenizer(TOK_PRESETS["tokenizer-tiny"]).save(root / "tok-b")  # other weights, the same 18 bits
    labels = np.arange(32) % 10
    tokens = np.random.default_rng(0).integers(0, 1 << 18, (32, 16))
    write_dataset(root / "data", {"train": (tokens, labels)}, grid=(4, 4), classes=[f"c{i}" for i in range(10)],
                  resolution=8, tokenizer={"preset": "tokenizer-tiny", "config": {},
                                           "checkpoint_sha256": checkpoint_sha256(root / "tok-a")})
    return root


def test_check_tokenizer_compares_weights_and_grid(encoded):
    record = td.tokens_record(td.read_manifest(encoded / "data"))
    assert record["tokenizer_sha256"] == checkpoint_sha256(encoded / "tok-a") and record["grid"] == [4, 4]
    td.check_tokenizer(record, encoded / "tok-a", downsample_factor=2)
    with pytest.raises(td.ManifestError, match=r"tok-b does not match the token dataset: its weights .* \(pass "
                                               r"--switch to use it anyway\)"):
        td.check_tokenizer(record, encoded / "tok-b", allow="--switch")
    with pytest.raises(td.ManifestError, match=r"its 4x downsampling gives a 2x2 grid at 8 px, the tokens are 4x4"):
        td.check_tokenizer(record, encoded / "tok-a", downsample_factor=4)


def test_stage2_refuses_another_tokenizer_than_the_datasets(encoded, tmp_path, monkeypatch):
    from stage2_ar.train import main as train_main

    run = ["--config", "ar-tiny", f"data.path={encoded / 'data'}", "data.clean_stale_shm=false",
           "schedule.max_steps=1", "sample_every=1", "sample_per_class=1"]
    one_line_error(train_main, run + [f"out_dir={tmp_path / 'bad'}", f"tokenizer={encoded / 'tok-b'}"],
                   match="tok-b does not match the token dataset")
    _assert_untouched(tmp_path / "bad")
    assert train_main(run + [f"out_dir={tmp_path / 'run'}", f"tokenizer={encoded / 'tok-a'}"]) == 0
    # a deliberate swap, documented: decodes the grids with tokenizer B
    assert train_main(run + [f"out_dir={tmp_path / 'swap-train'}", f"tokenizer={encoded / 'tok-b'}",
                             "allow_tokenizer_mismatch=true"]) == 0
    assert list((tmp_path / "swap-train" / "images").glob("samples-*.png"))
    ar = tmp_path / "run" / "step-00000001"
    assert ck.load_meta(ar)["extra"]["tokens"]["tokenizer_sha256"] == checkpoint_sha256(encoded / "tok-a")
    # an AR checkpoint from before the record: its training dataset's manifest is read instead
    legacy = tmp_path / "legacy"
    meta = ck.load_meta(ar)
    ck.save_checkpoint(legacy, ck.load_state_dict(ar), meta["config"], kind="ar",
                       extra={"train_config": meta["extra"]["train_config"]})

    monkeypatch.setattr(inception, "load_inception", stand_in)
    write_samples(tmp_path / "ref.npz", np.zeros((8, 8, 8, 3), np.uint8))
    for ckpt in (ar, legacy):
        args = ["--ckpt", str(ckpt), "--classes", "0", "--per-class", "4"]
        one_line_error(sample.main, args + ["--tokenizer", str(encoded / "tok-b"), "--out", str(tmp_path / "s")],
                       match=r"tok-b does not match the token dataset: .*--allow-tokenizer-mismatch")
        one_line_error(evaluate.main, args + ["--tokenizer", str(encoded / "tok-b"), "--ref", str(tmp_path / "ref.npz"),
                                              "--out", str(tmp_path / "e")], match="tok-b does not match")
        assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()
        assert sample.main(args + ["--tokenizer", str(encoded / "tok-a"), "--out", str(tmp_path / "ok")]) == 0
    assert sample.main(args + ["--tokenizer", str(encoded / "tok-b"), "--allow-tokenizer-mismatch",
                               "--out", str(tmp_path / "swap")]) == 0  # a deliberate swap
    assert (tmp_path / "swap" / "grid.png").is_file()


# ---------------------------------------------------------------------------------------------- real processes


def _run(module, *args):
    # PYTHONWARNINGS: third-party deprecation notices (torchdata) are not the tools' own output
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line_exit(r, match: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(match, lines[0]), r.stderr[-3000:]


@pytest.mark.slow
def test_real_commands_exit_1_with_one_line(pair, shards, tmp_path, photos):
    ar, tok = pair
    (tmp_path / "file").write_text("keep")
    damaged = _damaged_copies(ar, tmp_path)["weights"]
    cases = [
        (["stage1_tokenizer.convert_official", GOLDEN / "tokenizer_tiny.ckpt", tmp_path / "file"], "not a directory"),
        (["stage2_ar.convert_official", GOLDEN / "ar_tiny.ckpt", tmp_path / "c"], "pass --grid H,W and --head-dim D"),
        (["stage2_ar.sample", "--ckpt", ar, "--tokenizer", tok, "--classes", "0", "--top-p", "0", "--out",
          tmp_path / "s"], r"top_p must lie in \(0, 1\]"),
        (["stage2_ar.evaluate", "--ckpt", damaged, "--tokenizer", tok, "--ref", tmp_path, "--inception",
          tmp_path / "file", "--out", tmp_path / "e"], "file is not a plain tensor checkpoint"),
        (["stage1_tokenizer.evaluate", "--ckpt", tok, "--data", photos, "--resolution", "16", "--out", tmp_path],
         "is a directory: give the path of a file"),
        (["stage1_tokenizer.train", "--config", "tokenizer-tiny", f"data.root={photos}", "loss.perceptual_weight=0",
          f"out_dir={tmp_path / 'file'}"], "exists and is not a directory"),
        (["stage2_ar.train", "--config", "ar-tiny", f"data.path={shards}", "data.clean_stale_shm=false",
          f"out_dir={tmp_path / 'r'}", f"resume={damaged}"], "is not a training checkpoint: trainer_state.pt missing"),
    ]
    for args, match in cases:
        _one_line_exit(_run(*args), match)
    assert (tmp_path / "file").read_text() == "keep"
    assert not any((tmp_path / n).exists() for n in ("c", "s", "e", "r"))


# Runs each (module, argv) of argv[1] through the module's main in one process (one torch import for all).
RUNNER = """
import importlib, json, sys

results = []
for module, argv in json.loads(sys.argv[1]):
    try:
        results.append([importlib.import_module(module).main(argv), None])
    except SystemExit as e:
        results.append([1 if isinstance(e.code, str) else e.code, e.code if isinstance(e.code, str) else None])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_read_only_outputs_are_refused_before_any_work(pair, shards, photos):
    """Every tool, run as an unprivileged user, with its output inside a read-only directory."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root ignores directory permissions and setpriv is not available to drop them")
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="ro-test-"))  # not under pytest's 0700 tmp: the other user reads it
    try:
        for src in (*pair, shards, photos):
            shutil.copytree(src, root / src.name)
        write_samples(root / "s.npz", np.zeros((8, 8, 8, 3), np.uint8))
        (root / "ro").mkdir()
        (root / "home").mkdir()
        for p in [root, *root.rglob("*")]:
            p.chmod(0o777 if p.name == "home" else 0o755 if p.is_dir() else 0o644)
        (root / "ro").chmod(0o555)
        ro, ar, tok, data = root / "ro", root / pair[0].name, root / pair[1].name, root / photos.name
        cases = [
            ("stage1_tokenizer.convert_official", [GOLDEN / "tokenizer_tiny.ckpt", ro / "tok"],
             "ro/tok: .*ro is not writable"),
            ("stage2_ar.convert_official", [GOLDEN / "ar_tiny.ckpt", ro, "--grid", "4,4", "--head-dim", "16"],
             "ro/ar: .*ro is not writable"),
            ("stage2_ar.sample", ["--ckpt", ar, "--tokenizer", tok, "--classes", "0", "--out", ro],
             "ro is not writable"),
            ("stage2_ar.evaluate", ["--samples", root / "s.npz", "--ref", root / "s.npz", "--out", ro / "e"],
             "ro is not writable"),
            ("stage1_tokenizer.evaluate", ["--ckpt", tok, "--data", data, "--resolution", "16", "--out", ro / "r.json"],
             "ro is not writable"),
            ("stage1_tokenizer.train", ["--config", "tokenizer-tiny", f"data.root={data}", "loss.perceptual_weight=0",
                                        f"out_dir={ro / 'run'}"], "ro is not writable"),
            ("stage2_ar.train", ["--config", "ar-tiny", f"data.path={root / shards.name}", "data.clean_stale_shm=false",
                                 f"out_dir={ro / 'run'}"], "ro is not writable"),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "HOME": str(root / "home"), "TORCH_HOME": str(root / "home")}
        argv = json.dumps([[m, [str(a) for a in args]] for m, args, _ in cases])
        r = subprocess.run([*user, sys.executable, "-c", RUNNER, argv], cwd=root, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        for (module, _, match), (rc, msg) in zip(cases, json.loads(r.stdout.strip().splitlines()[-1])):
            assert rc == 1 and msg.startswith("error: ") and "\n" not in msg and re.search(match, msg), (module, msg)
        assert list(ro.iterdir()) == [] and stat.S_IMODE(ro.stat().st_mode) == 0o555
    finally:
        (root / "ro").chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
