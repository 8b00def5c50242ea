"""What a user can type or leave behind, without Ray: every bad input is one ``error: ...`` line, refused
before anything is written and before Ray starts; one writer per dataset; file names that are not UTF-8;
the accelerator choice of the tokenizer actors; the code version the manifest records."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dataprep import encode, listing, pipeline, state
from dataprep.sample_images import image_folder
from shared.token_dataset.provenance import code_version, git_commit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs():
    """A world-readable folder (the read-only test runs part of the job as an unprivileged user) holding
    two images and a tiny tokenizer."""
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    base = Path(tempfile.mkdtemp(prefix="dataprep-inputs-"))
    os.chmod(base, 0o755)
    image_folder(base / "data", classes=2, per_class=1)
    torch.manual_seed(0)
    Tokenizer(PRESETS["tokenizer-tiny"]).save(base / "ckpt")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def no_ray(monkeypatch):
    """Every refusal here must come before Ray is started or joined."""
    def refuse(*a, **k):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(pipeline, "init_ray", refuse)


def _args(base, out, **over):
    a = {"--data": base / "data", "--tokenizer": base / "ckpt", "--out": out, "--resolution": 16,
         "--chunk-size": 1}
    a.update(over)
    return [x for k, v in a.items() if v is not None for x in (k, str(v))]


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def _refused(argv, capsys) -> str:
    """The job refuses ``argv`` with one line starting 'error: ' (what the CLI prints) and a non-zero exit."""
    with pytest.raises(SystemExit) as e:
        encode.main([str(a) for a in argv])
    err = capsys.readouterr().err
    code = e.value.code
    msg = code if isinstance(code, str) else err  # a str exit code is what Python prints on stderr
    assert code not in (0, None), argv
    lines = msg.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, msg)
    return lines[0]


def test_bad_inputs_are_one_line_before_anything_is_written(inputs, tmp_path, capsys, no_ray):
    out = tmp_path / "new" / "ds"  # not there: must stay absent, parents included
    no_weights = tmp_path / "no-weights"
    shutil.copytree(inputs / "ckpt", no_weights)
    (no_weights / "model.safetensors").unlink()
    truncated = tmp_path / "truncated"
    shutil.copytree(inputs / "ckpt", truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    latin1 = tmp_path / "list.tsv"
    latin1.write_bytes("train/class_00/caf\xe9.png\t0\n".encode("latin-1"))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a dataset")
    cases = [
        ({"--tokenizer": no_weights}, "model.safetensors is missing"),
        ({"--tokenizer": truncated}, "damaged or not a safetensors file"),
        ({"--tokenizer": a_file}, "not a checkpoint directory"),
        ({"--out": a_file}, "exists and is not a directory"),
        ({"--cpus-per-actor": -1}, "--cpus-per-actor: expected a number >= 0"),
        ({"--gpus-per-actor": -0.5}, "--gpus-per-actor: expected a number >= 0"),
        ({"--gpus-per-actor": "nan"}, "--gpus-per-actor: expected a number >= 0"),
        ({"--num-cpus": -2}, "--num-cpus: expected a positive integer"),
        ({"--num-cpus": 0}, "--num-cpus: expected a positive integer"),
        ({"--object-store-mb": -1}, "--object-store-mb: expected a positive integer"),
        ({"--batch-size": "x"}, "--batch-size: expected a positive integer"),
        ({"--chunk-size": 0}, "--chunk-size: expected a positive integer"),
        ({"--resolution": -16}, "--resolution: expected a positive integer"),
        ({"--resolution": 15}, "--resolution 15"),
        ({"--split": "../up"}, "split name '../up'"),
        ({"--split": "val"}, "no split folder"),
        ({"--views": "zoom"}, "--views"),
        ({"--file-list": latin1}, r"list.tsv:1: not UTF-8 text \(byte 0xe9\)"),
        ({"--file-list": tmp_path / "missing.tsv"}, "cannot read .*missing.tsv: No such file"),
        ({"--data": None, "--file-list": None}, "give --data"),
        ({"--code-version": "two words"}, "--code-version"),
        ({"--actors": 8, "--num-cpus": 2}, "8 actors x 0.5 CPUs leave less than 1 of the cluster's 2 CPUs"),
        ({"--precision": "fp8"}, "argument --precision: invalid choice"),
        ({"--bogus": 1}, "unrecognized arguments: --bogus"),
        ({"--tokenizer": None}, "the following arguments are required: --tokenizer"),
    ]
    for over, want in cases:
        before = _snapshot(Path(over["--out"])) if "--out" in over else None
        line = _refused(_args(inputs, out, **over), capsys)
        assert re.search(want, line), (over, line)
        assert not out.parent.exists(), (over, "wrote under --out")
        if "--out" in over:
            assert _snapshot(Path(over["--out"])) == before


def test_damaged_state_and_foreign_directories_are_left_alone(inputs, tmp_path, capsys, no_ray):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "state.json").write_bytes(b"\xff{ not json")
    before = _snapshot(out)
    line = _refused(_args(inputs, out), capsys)
    assert "state.json is damaged" in line and _snapshot(out) == before
    (out / "state.json").write_text('{"unrelated": 1}')
    before = _snapshot(out)
    assert "not a dataprep state record" in _refused(_args(inputs, out), capsys)
    assert _snapshot(out) == before


def test_a_second_writer_is_refused_naming_the_holder(inputs, tmp_path, capsys, no_ray):
    out = tmp_path / "ds"
    out.mkdir()
    with state.Lock(out):  # another open file description: flock refuses it even in this process
        assert state.writer_of(out) == f"pid {os.getpid()} on host {socket.gethostname()}"
        line = _refused(_args(inputs, out), capsys)
        assert f"being written by another job (pid {os.getpid()} on host {socket.gethostname()})" in line
        assert sorted(p.name for p in out.iterdir()) == [state.LOCK]
    assert state.writer_of(out) is None and not (out / state.LOCK).exists()
    # A holder killed with SIGKILL leaves no stale lock: the kernel drops it.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from dataprep.state import Lock; l = Lock(Path(sys.argv[1])).__enter__(); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert state.writer_of(out) == f"pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(state.LockedError, match=f"pid {holder.pid}"):
            state.Lock(out).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / state.LOCK).exists() and state.writer_of(out) is None
    with state.Lock(out):
        pass


def test_an_address_nothing_answers_at_is_one_line(inputs, tmp_path, capsys, monkeypatch):
    """ray.init would retry an unreachable cluster address for ever."""
    import ray

    from support.free_port import free_port

    out = tmp_path / "ds"
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    line = _refused(_args(inputs, out, **{"--address": address}), capsys)
    assert line.startswith(f"error: cannot join Ray at {address}: nothing answers at {address} (")
    monkeypatch.setenv("RAY_ADDRESS", address)  # as a job server sets it
    assert _refused(_args(inputs, out), capsys).startswith(f"error: cannot join Ray at {address}: ")
    assert not ray.is_initialized() and not out.exists()


@contextmanager
def _unprivileged():
    """Permission checks as an ordinary user (root writes anywhere): the effective uid of nobody."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_read_only_out_is_one_line(inputs, capsys, no_ray):
    ro = Path(tempfile.mkdtemp(prefix="ro-", dir=inputs))
    os.chmod(ro, 0o555)
    try:
        with _unprivileged():
            # an existing empty directory, and a new one inside it
            for out in (ro, ro / "new"):
                line = _refused(_args(inputs, out), capsys)
                assert re.search(rf"error: --out cannot write {out}: (.* is not writable|Permission denied)$",
                                 line), line
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(ro)


def test_an_unreadable_class_folder_is_one_line(inputs, tmp_path, capsys, no_ray):
    """os.walk skips folders it cannot list: the job would lose their images without a word."""
    data = Path(tempfile.mkdtemp(prefix="unreadable-", dir=inputs))
    os.chmod(data, 0o755)
    shutil.copytree(inputs / "data" / "train", data / "train")
    locked = data / "train" / "class_01"
    os.chmod(locked, 0o000)
    try:
        with _unprivileged():
            line = _refused(_args(inputs, tmp_path / "ds", **{"--data": data}), capsys)
        assert line == f"error: cannot list {locked}: Permission denied"
    finally:
        os.chmod(locked, 0o755)
        shutil.rmtree(data)


def test_ctrl_c_keeps_the_commits_and_releases_the_lock(inputs, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode, "start_ray", lambda args: "existing")
    monkeypatch.setattr(encode, "encode_chunks", interrupted)
    out = tmp_path / "ds"
    assert encode.main(_args(inputs, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: interrupted; the chunks committed so far are kept: run the same command to resume"
    assert not any("Traceback" in ln for ln in err)
    assert state.State.load(out) is not None and state.writer_of(out) is None and not (out / state.LOCK).exists()


# --- listings ---------------------------------------------------------------------------------------------

def test_file_names_that_are_not_utf8_become_failures(tmp_path):
    cls = tmp_path / "train" / "cls"
    cls.mkdir(parents=True)
    image_folder(tmp_path / "ok", classes=1, per_class=1)
    good = next((tmp_path / "ok" / "train" / "class_00").iterdir())
    shutil.copy(good, cls / "a.png")
    shutil.copy(good, os.path.join(os.fsencode(cls), b"caf\xe9.png"))  # a valid image with a Latin-1 name
    bad_dir = os.path.join(os.fsencode(tmp_path / "train"), b"d\xfcr")
    os.mkdir(bad_dir)
    shutil.copy(good, os.path.join(bad_dir, b"b.png"))
    lst = listing.scan_folder(tmp_path, "train")
    assert lst.classes == ["cls", "d\\xfcr"]
    assert [(i.path, i.label, i.reason) for i in lst.items] == [
        ("train/cls/a.png", 0, ""), ("train/cls/caf\\xe9.png", 0, listing.NOT_UTF8),
        ("train/d\\xfcr/b.png", 1, listing.NOT_UTF8)]
    assert lst.sha256() == listing.scan_folder(tmp_path, "train").sha256()
    # ... and reach the failures table instead of a decoder (the path as listed cannot be opened)
    (row,) = pipeline.group_rows("train", 0, [lst.items])
    out = pipeline.decode_group(row, str(tmp_path), 16, ["center"])
    assert [tuple(e) for e in json.loads(out["errors"])] == [
        (1, "train/cls/caf\\xe9.png", 0, listing.NOT_UTF8), (2, "train/d\\xfcr/b.png", 1, listing.NOT_UTF8)]
    assert len(out["pixels"]) == 16 * 16 * 3


def test_file_list_must_be_utf8(tmp_path):
    f = tmp_path / "list.tsv"
    f.write_bytes(b"a.png\t0\nb\xff.png\t1\n")
    with pytest.raises(listing.ListingError, match=r"list.tsv:2: not UTF-8 text \(byte 0xff\)"):
        listing.read_file_list(f)
    f.write_bytes("\ufeffa.png\t0\n".encode("utf-8"))  # a BOM is fine
    assert [i.path for i in listing.read_file_list(f).items] == ["a.png"]


# --- accelerators -----------------------------------------------------------------------------------------

def test_actor_device_and_ray_resources_follow_the_accelerator(monkeypatch):
    from shared import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_npu_available", lambda: False)
    assert pipeline.pick_device(0) == "cpu"
    with pytest.raises(RuntimeError, match="given 1 accelerators but torch sees no CUDA device and no Ascend NPU"):
        pipeline.pick_device(1)
    monkeypatch.setattr(device, "_npu_available", lambda: True)  # an Ascend node (torch_npu)
    assert pipeline.pick_device(0.5) == "npu" and pipeline.pick_device(0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pipeline.pick_device(1) == "cuda"

    npu_cluster = {"CPU": 64.0, "NPU": 8.0}
    assert pipeline.accelerator_resource(npu_cluster) == "NPU"
    assert pipeline.accelerator_resource({"CPU": 8.0, "GPU": 2.0, "NPU": 8.0}) == "GPU"
    assert pipeline.accelerator_resource({"CPU": 8.0}) is None
    pipeline.check_resources(npu_cluster, actors=8, cpus_per_actor=1, gpus_per_actor=1)
    with pytest.raises(ValueError, match="9 actors x 1 accelerators need 9 NPUs, the cluster has 8"):
        pipeline.check_resources(npu_cluster, actors=9, cpus_per_actor=1, gpus_per_actor=1)
    with pytest.raises(ValueError, match="need 1 GPUs, the cluster has 0 .and no Ascend NPU"):
        pipeline.check_resources({"CPU": 8.0}, actors=1, cpus_per_actor=1, gpus_per_actor=1)
    assert pipeline.actor_resources(1, "NPU") == {"resources": {"NPU": 1}}
    assert pipeline.actor_resources(0.5, "GPU") == {"num_gpus": 0.5}
    assert pipeline.actor_resources(0, "NPU") == {}


# --- provenance -------------------------------------------------------------------------------------------

def test_code_version_reads_refs_and_takes_a_given_commit(tmp_path):
    sha = "0123456789abcdef" * 2 + "01234567"
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_commit(tmp_path / "repo") == sha[:12]
    (git / "refs" / "heads" / "main").unlink()  # after `git gc`: only in packed-refs
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{'f' * 40} refs/heads/other\n{sha} refs/heads/main\n")
    assert git_commit(tmp_path / "repo") == sha[:12]
    (git / "HEAD").write_text(sha + "\n")  # detached
    assert git_commit(tmp_path / "repo") == sha[:12]
    wt = tmp_path / "worktree"
    wt.mkdir()
    (wt / ".git").write_text(f"gitdir: {git}\n")
    assert git_commit(wt) == sha[:12]
    assert git_commit(tmp_path / "no-repo") is None
    assert code_version("abc1234-dirty").endswith("+abc1234-dirty")
