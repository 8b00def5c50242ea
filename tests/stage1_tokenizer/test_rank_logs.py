"""Logs per rank under a real 2-process torchrun: rank 0 logs the run's lines once, rank 1 only its own
warnings, labelled with its real rank (the loggers are made at import, before the process group exists)."""
import os
import re
import subprocess
from collections import Counter

import pytest

pytestmark = pytest.mark.slow

LINE = re.compile(r"^\d\d:\d\d:\d\d \[rank(\d+)\] (INFO|WARNING|ERROR) (\S+): (.*)$")


def test_two_ranks_log_each_info_line_once_and_label_warnings_by_rank(tmp_path, photos, torchrun_cmd):
    # an empty torch hub: every rank builds LPIPS with a random trunk and warns about it (tokenizer-tiny allows it)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub")}
    cmd = torchrun_cmd + ["-m", "stage1_tokenizer.train", "--config", "tokenizer-tiny", f"data.root={photos}",
                          f"out_dir={tmp_path / 'run'}", "max_steps=2", "ckpt_every=2", "threads=1",
                          "data.resolution=16", "tensorboard=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [m.groups() for m in map(LINE.match, r.stderr.splitlines()) if m]
    info = [(rank, name, msg) for rank, level, name, msg in lines if level == "INFO"]
    assert info and {rank for rank, _, _ in info} == {"0"}  # only rank 0 logs the run's lines...
    assert max(Counter((name, msg) for _, name, msg in info).values()) == 1  # ...each of them once
    assert any("saved" in msg for _, _, msg in info)
    warned = {rank for rank, level, name, msg in lines if level == "WARNING" and "RANDOM trunk" in msg}
    assert warned == {"0", "1"}  # each rank's own warning, under its real rank
