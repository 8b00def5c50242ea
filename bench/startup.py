"""Start-up of every command: ``--help`` now (the command line parsed before any heavy import) against the
same ``--help`` with the module's own imports done first (what every command paid before: torch, Streaming
and the rest imported at the top of the module), and a trainer's time to the end of its first step.

    python bench/startup.py [--repeats 3] [--skip-trainer]

Each figure is the median wall time of a fresh ``python`` process (interpreter start included). "today" is
the same command with ``import MODULE`` done before its ``--help`` (the module's top-level imports, which
used to run first); the ratio is today / now. The trainer line times ``python -m stage1_tokenizer.train
--config tokenizer-tiny max_steps=1`` on a few generated images, against the same run with its imports
forced first: the lazy imports only move the import cost, so that ratio stays near 1.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (how it is typed, the module that file or package name is)
COMMANDS = [("stage1_tokenizer.train", "stage1_tokenizer.train"),
            ("stage1_tokenizer.evaluate", "stage1_tokenizer.evaluate"),
            ("stage1_tokenizer.reconstruct", "stage1_tokenizer.reconstruct"),
            ("stage1_tokenizer.convert_official", "stage1_tokenizer.convert_official"),
            ("stage2_ar.train", "stage2_ar.train"), ("stage2_ar.sample", "stage2_ar.sample"),
            ("stage2_ar.evaluate", "stage2_ar.evaluate"), ("stage2_ar.convert_official", "stage2_ar.convert_official"),
            ("dataprep/encode.py", "dataprep.encode"), ("dataprep.encode", "dataprep.encode"),
            ("dataprep.publish", "dataprep.publish"), ("dataprep.inspect_dataset", "dataprep.inspect_dataset"),
            ("experiments.run", "experiments.run"), ("scripts/demo.py", "scripts.demo")]

# run MODULE (or FILE) as its command would, optionally after importing MODULE the usual way first
RUNNER = """
import importlib, os, runpy, sys
target, module, preload = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if preload:
    if target.endswith(".py"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    importlib.import_module(module)
sys.argv = [target, *sys.argv[4:]]
if target.endswith(".py"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def timed(target: str, module: str, preload: bool, args: list, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", RUNNER, target, module, "1" if preload else "0", *args], cwd=REPO,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"error: {target} {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return statistics.median(times)


def photos(root: Path, n: int = 8, size: int = 16) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-trainer", action="store_true")
    a = p.parse_args()
    print(f"start-up, median of {a.repeats} fresh processes; {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"{'command --help':38s} {'now s':>7s} {'today s':>8s} {'ratio':>6s}")
    worst = 0.0
    for target, module in COMMANDS:
        now = timed(target, module, False, ["--help"], a.repeats)
        today = timed(target, module, True, ["--help"], a.repeats)
        worst = max(worst, now)
        print(f"{target:38s} {now:7.2f} {today:8.2f} {today / now:5.1f}x")
    print(f"slowest --help now: {worst:.2f} s")
    if not a.skip_trainer:
        with tempfile.TemporaryDirectory() as tmp:
            root = photos(Path(tmp) / "photos")
            runs = []
            for preload in (False, True):
                args = ["--config", "tokenizer-tiny", f"data.root={root}", f"out_dir={tmp}/run-{int(preload)}",
                        "max_steps=1", "data.resolution=16", "tensorboard=false", "threads=1", "resume=never"]
                runs.append(timed("stage1_tokenizer.train", "stage1_tokenizer.train", preload, args, 1))
        print(f"trainer to the end of its first step (tokenizer-tiny, 1 step): now {runs[0]:.2f} s, today "
              f"{runs[1]:.2f} s, ratio {runs[1] / runs[0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
